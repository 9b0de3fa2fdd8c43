# BHViT-tiny + Semantic FPN (the neck and head widths of fpn_bhvit_ade20k.py)
# on the synthetic "demo shapes" data, with the demo's data, schedule and
# hooks (upernet_bhvit-tiny_demo-shapes.py): the full-precision reference of
# fpn_bhvit-tiny_demo-shapes-binary-head.py.
#   python tools/demo/run_demo.py \
#       --config configs/bhvit/fpn_bhvit-tiny_demo-shapes.py \
#       --work-dir work_dirs/demo-fpn [--iters 1200]
_base_ = ['./upernet_bhvit-tiny_demo-shapes.py']
norm_cfg = dict(type='BN', requires_grad=True)
model = dict(
    neck=dict(
        type='FPN',
        in_channels=[64, 128, 256, 512],
        out_channels=256,
        num_outs=4),
    decode_head=dict(
        _delete_=True,
        type='FPNHead',
        in_channels=[256, 256, 256, 256],
        in_index=[0, 1, 2, 3],
        feature_strides=[4, 8, 16, 32],
        channels=128,
        dropout_ratio=0.1,
        num_classes={{_base_.num_classes}},
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    auxiliary_head=None)
