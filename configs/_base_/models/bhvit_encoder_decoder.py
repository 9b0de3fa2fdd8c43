# EncoderDecoder with a BHViT-small backbone, mmseg style; the head files
# (upernet_bhvit.py, fpn_bhvit.py) add the neck and heads.
# Importing mmbhvit registers BHViT, RSLVFDataset and CheckLabelRange and
# lets mmseg run on mmcv-lite.
custom_imports = dict(imports=['mmbhvit'], allow_failed_imports=False)
norm_cfg = dict(type='SyncBN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255)
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    pretrained=None,
    backbone=dict(
        type='BHViT',
        arch='small',
        in_channels=3,
        img_size=224,  # the ImageNet resolution: sizes the pos. embeddings
        attn_binarizer='lsq',
        binary_merge=False,
        weight_bits=1,
        act_bits=1,
        drop_path_rate=0.1,
        norm_cfg=norm_cfg,
        out_indices=(0, 1, 2, 3),
        final_norm=True,
        frozen_stages=-1,
        norm_eval=False,
        # ImageNet-pretrained BHViT: pass the file with
        #   --cfg-options model.backbone.init_cfg.checkpoint=PATH
        # tools/train.py refuses checkpoint=None (a random backbone); set
        # init_cfg=None to train from random weights on purpose.
        init_cfg=dict(type='Pretrained', checkpoint=None,
                      prefix='backbone.')),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
