# RS-LVF remote-sensing segmentation, 512x512 crops of GeoTIFF tiles.
# Layout (tools/dataset_converters/rs_lvf.py writes it; see
# docs/remote_sensing.md and configs/bhvit/README.md):
#   data/rs_lvf/classes.json                 {"classes": [...],
#                                             "palette": [[r, g, b], ...]}
#   data/rs_lvf/bands.json                   per-band normalisation
#   data/rs_lvf/tiles.json                   scene + window of every tile
#   data/rs_lvf/img_dir/{train,val}/*.tif    tiles, the scenes' bit depth
#   data/rs_lvf/ann_dir/{train,val}/*.png    uint8 class index, 255 = ignore
# The class list is read from classes.json (or classes.txt); it is never
# guessed. To give it in the config instead, set on every dataset
#   metainfo=dict(classes=(...), palette=[...])
# (if both exist they must agree).
# LoadRSImage reads any band count and bit depth and maps each band onto
# float [0, 255] with bands.json (8-bit data without bands.json: as is);
# bands come in file order (RGB), so the data preprocessor of the RS-LVF
# configs has bgr_to_rgb=False.
dataset_type = 'RSLVFDataset'
data_root = 'data/rs_lvf'
crop_size = (512, 512)
train_pipeline = [
    dict(type='LoadRSImage'),
    dict(type='LoadAnnotations'),
    # num_classes comes from the dataset's class list
    dict(type='CheckLabelRange'),
    dict(
        type='RandomResize',
        scale=(512, 512),
        ratio_range=(0.5, 2.0),
        keep_ratio=True),
    dict(type='RandomCrop', crop_size=crop_size, cat_max_ratio=0.75),
    # aerial views have no "up": flip both ways
    dict(type='RandomFlip', prob=0.5, direction='horizontal'),
    dict(type='RandomFlip', prob=0.5, direction='vertical'),
    # brightness/contrast in float for any band count (PhotoMetricDistortion
    # needs 3 bands and rounds to uint8)
    dict(type='RandomGainBias', prob=0.5),
    dict(type='PackSegInputs')
]
# Tiles at their own resolution; the models' test_cfg slides a 512x512
# window over them (and tools/rs_inference.py over whole scenes).
test_pipeline = [
    dict(type='LoadRSImage'),
    dict(type='LoadAnnotations'),
    dict(type='CheckLabelRange'),
    dict(type='PackSegInputs')
]
img_ratios = [0.5, 0.75, 1.0, 1.25, 1.5, 1.75]
tta_pipeline = [
    dict(type='LoadRSImage'),
    dict(
        type='TestTimeAug',
        transforms=[
            [
                dict(type='Resize', scale_factor=r, keep_ratio=True)
                for r in img_ratios
            ],
            [
                dict(type='RandomFlip', prob=0., direction='horizontal'),
                dict(type='RandomFlip', prob=1., direction='horizontal')
            ],
            [dict(type='LoadAnnotations')],
            [dict(type='CheckLabelRange')],
            [dict(type='PackSegInputs')],
        ])
]
train_dataloader = dict(
    batch_size=2,  # per GPU; the configs assume 8 GPUs (8x2 = 16)
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='InfiniteSampler', shuffle=True),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='img_dir/train', seg_map_path='ann_dir/train'),
        img_suffix='.tif',
        pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=4,
    persistent_workers=True,
    sampler=dict(type='DefaultSampler', shuffle=False),
    dataset=dict(
        type=dataset_type,
        data_root=data_root,
        data_prefix=dict(img_path='img_dir/val', seg_map_path='ann_dir/val'),
        img_suffix='.tif',
        pipeline=test_pipeline))
test_dataloader = val_dataloader

val_evaluator = dict(type='IoUMetric', iou_metrics=['mIoU'])
test_evaluator = val_evaluator
