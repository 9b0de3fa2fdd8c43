# Runtime shared by the BHViT classification configs (mmpretrain
# conventions; the segmentation runtime is default_runtime.py).
default_scope = 'mmpretrain'
custom_imports = dict(
    imports=['mmbhvit', 'mmbhvit.engine'], allow_failed_imports=False)

default_hooks = dict(
    timer=dict(type='IterTimerHook'),
    logger=dict(type='LoggerHook', interval=100),
    param_scheduler=dict(type='ParamSchedulerHook'),
    checkpoint=dict(type='CheckpointHook', interval=1, max_keep_ckpts=3),
    sampler_seed=dict(type='DistSamplerSeedHook'),
    visualization=dict(type='VisualizationHook', enable=False),
    # NaN/inf input or loss: stop before any weight or BN statistic changes
    nonfinite_check=dict(type='NonFiniteCheckHook'),
)

# Checkpoints carry the random states and the data position, so that
# --resume continues bit-identically (mmbhvit.engine.ExactResumeHook).
# Configs that set their own custom_hooks must list it again.
custom_hooks = [dict(type='ExactResumeHook')]

env_cfg = dict(
    cudnn_benchmark=False,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    dist_cfg=dict(backend='nccl'),
)

vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(type='UniversalVisualizer', vis_backends=vis_backends)

log_level = 'INFO'
load_from = None
resume = False
randomness = dict(seed=None, deterministic=False)
