# 160k iterations, AdamW, linear warm-up then poly decay (UPerNet, as for
# the transformer backbones of mmseg: Swin, Twins, ConvNeXt).
optimizer = dict(
    type='AdamW', lr=6e-5, betas=(0.9, 0.999), weight_decay=0.01)
optim_wrapper = dict(
    type='OptimWrapper',
    optimizer=optimizer,
    clip_grad=None,
    # No weight decay on: norm layers, every 1-D parameter (biases, the
    # binary layers' learnable shifts, RPReLU slopes/biases, LayerScale,
    # token-mixing weights), the positional embeddings, and the attention
    # binarizers' scalar step sizes / zero points / thresholds.
    paramwise_cfg=dict(
        norm_decay_mult=0.,
        flat_decay_mult=0.,
        custom_keys={
            'pos_embed': dict(decay_mult=0.),
            'binarizer': dict(decay_mult=0.),
        }))
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=1.0,
        begin=1500,
        end=160000,
        by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters=160000, val_interval=16000)
val_cfg = dict(type='ValLoop')
test_cfg = dict(type='TestLoop')
default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=50, log_metric_by_epoch=False),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', by_epoch=False, interval=16000),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='SegVisualizationHook'),
    # NaN/inf input or loss: stop before any weight or BN statistic changes
    nonfinite_check=dict(type='NonFiniteCheckHook'))
