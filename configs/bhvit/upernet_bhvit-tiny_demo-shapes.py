# BHViT-tiny + a slim UPerNet on the synthetic "demo shapes" data: a CPU
# run of a few minutes (`make demo` = tools/demo/run_demo.py).
# Single process: plain BN, 96x96 images, random initialisation.
_base_ = [
    '../_base_/models/upernet_bhvit.py',
    '../_base_/datasets/demo_shapes.py', '../_base_/default_runtime.py'
]
custom_imports = dict(imports=['mmbhvit'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
num_classes = 5  # background, circle, square, triangle, ring
crop_size = (96, 96)
data_preprocessor = dict(size=None, size_divisor=32)  # any image size
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        arch='tiny', drop_path_rate=0., norm_cfg=norm_cfg, init_cfg=None),
    decode_head=dict(
        channels=128, num_classes=num_classes, norm_cfg=norm_cfg),
    auxiliary_head=dict(
        channels=64, num_classes=num_classes, norm_cfg=norm_cfg))

max_iters = 300
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=dict(
        type='AdamW', lr=1e-3, betas=(0.9, 0.999), weight_decay=0.01),
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        flat_decay_mult=0.,
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'binarizer': dict(decay_mult=0.),
        }))
param_scheduler = [
    dict(type='LinearLR', start_factor=0.01, by_epoch=False, begin=0,
         end=30),
    dict(type='PolyLR', eta_min=0.0, power=1.0, begin=30, end=max_iters,
         by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=max_iters, val_interval=max_iters)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=20, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(
        type='CheckpointHook', by_epoch=False, interval=max_iters,
        max_keep_ckpts=1),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'),
    # NaN/inf input or loss: stop before any weight or BN statistic changes
    nonfinite_check=dict(type='NonFiniteCheckHook'))
randomness = dict(seed=0)
env_cfg = dict(cudnn_benchmark=False, dist_cfg=dict(backend='gloo'))
