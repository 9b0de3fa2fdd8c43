# Runtime shared by the BHViT segmentation configs (mmseg conventions).
default_scope = 'mmseg'
env_cfg = dict(
    cudnn_benchmark=True,
    mp_cfg=dict(mp_start_method='fork', opencv_num_threads=0),
    # tools/train.py and tools/test.py switch this to 'gloo' when CUDA is
    # not available (CPU multi-process runs).
    dist_cfg=dict(backend='nccl'),
)
vis_backends = [dict(type='LocalVisBackend')]
visualizer = dict(
    type='SegLocalVisualizer', vis_backends=vis_backends, name='visualizer')
log_processor = dict(by_epoch=False)
# Checkpoints carry the random states and the data position, so that
# --resume continues bit-identically (mmbhvit.engine.ExactResumeHook).
# Configs that set their own custom_hooks must list it again.
custom_hooks = [dict(type='ExactResumeHook')]
log_level = 'INFO'
load_from = None
resume = False

tta_model = dict(type='SegTTAModel')
