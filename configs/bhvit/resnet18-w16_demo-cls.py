# The teacher of the classification demo: a narrow ResNet-18 (16 stem / base
# channels) trained on the demo textures for a few epochs on the CPU:
#   python tools/dataset_converters/make_demo_cls_dataset.py data/demo_cls
#   python tools/train.py configs/bhvit/resnet18-w16_demo-cls.py
# bhvit-reduced_demo-cls.py then distils from its last checkpoint.
_base_ = [
    '../_base_/datasets/demo_cls.py',
    '../_base_/default_runtime_cls.py',
]
custom_imports = dict(
    imports=['mmbhvit', 'mmbhvit.engine'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='ResNet',
        depth=18,
        stem_channels=16,
        base_channels=16,
        num_stages=4,
        out_indices=(3, ),
        style='pytorch'),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=5,
        in_channels=128,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, )))

optim_wrapper = dict(
    optimizer=dict(type='AdamW', lr=2e-3, weight_decay=1e-4))
param_scheduler = [
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=10, T_max=10,
         eta_min=0.)
]
train_cfg = dict(by_epoch=True, max_epochs=10, val_interval=10)
val_cfg = dict()
test_cfg = dict()

default_hooks = dict(
    logger=dict(type='LoggerHook', interval=10),
    checkpoint=dict(type='CheckpointHook', interval=10, max_keep_ckpts=1))
randomness = dict(seed=0)
