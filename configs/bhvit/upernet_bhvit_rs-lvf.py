# BHViT-small + UPerNet, RS-LVF, 512x512 crops, 160k iterations,
# 8 GPUs x 2 images. ImageNet-pretrained backbone:
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = [
    '../_base_/models/upernet_bhvit.py', '../_base_/datasets/rs_lvf.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_160k.py'
]
custom_imports = dict(imports=['mmbhvit'], allow_failed_imports=False)
# RS-LVF's class list is not public: the dataset reads it from
# data/rs_lvf/classes.json. `num_classes` must equal its length; 2 is only
# a placeholder. tools/train.py and tools/test.py compare the two and stop
# with the command to fix it, e.g.
#   --cfg-options model.decode_head.num_classes=N \
#                 model.auxiliary_head.num_classes=N
num_classes = 2
crop_size = (512, 512)
# LoadRSImage yields the bands in file order (R, G, B) on a 0..255 scale:
# ImageNet's statistics in RGB order, no channel swap
data_preprocessor = dict(size=crop_size, bgr_to_rgb=False)
model = dict(
    data_preprocessor=data_preprocessor,
    # tiles and scenes larger than a crop: overlapping 512x512 windows,
    # logits averaged where they overlap (tools/rs_inference.py uses the
    # same grid over whole scenes)
    test_cfg=dict(mode='slide', crop_size=crop_size, stride=(341, 341)),
    backbone=dict(arch='small'),
    decode_head=dict(num_classes=num_classes),
    auxiliary_head=dict(num_classes=num_classes))

# 8 GPUs x 2 images per GPU (total batch 16)
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
