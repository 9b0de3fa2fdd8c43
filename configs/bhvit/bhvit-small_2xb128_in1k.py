# BHViT-small, binary patch merging, ImageNet-1k: the paper's recipe
# (100 epochs, AdamW 5e-4, 2 x 128 images, distillation from DeiT-small,
# binary weight regularization in the last 10% of the epochs).
# Reported top-1 (paper): 68.4.
_base_ = [
    '../_base_/models/bhvit_small.py',
    '../_base_/datasets/imagenet_bs128_bhvit.py',
    '../_base_/schedules/imagenet_bs256_100e_adamw_bhvit.py',
    '../_base_/default_runtime_cls.py',
]
custom_imports = dict(
    imports=['mmbhvit', 'mmbhvit.engine'], allow_failed_imports=False)
default_scope = 'mmpretrain'

model = dict(
    type='DistillImageClassifier',
    backbone=dict(binary_merge=True),
    # L = 0.1 L_cls + 0.8 L_distill (+ 0.1 L_re once switched on)
    loss_weights=dict(cls=0.1, distill=0.8),
    distill_loss=dict(type='CrossEntropyLoss', use_soft=True),
    # Every 1-bit weight tensor, as in the paper. The official code leaves
    # out the binary patch-merging convs: exclude_within=('PatchMerging', ).
    reg_loss=dict(type='BinaryWeightRegLoss', loss_weight=0.1),
    # DeiT-small teacher (mmpretrain weights, ImageNet top-1 80.7), frozen.
    teacher=dict(
        type='ImageClassifier',
        backbone=dict(
            type='VisionTransformer',
            arch='deit-small',
            img_size=224,
            patch_size=16),
        neck=None,
        head=dict(
            type='VisionTransformerClsHead', num_classes=1000,
            in_channels=384)),
    teacher_checkpoint='checkpoints/'
    'deit-small_pt-4xb256_in1k_20220218-9425b9bb.pth',
    allow_random_teacher=False,
)

# L_re on for the last 10% of the epochs (epochs 90-99).
# (a list replaces the base one: ExactResumeHook of the runtime is repeated)
custom_hooks = [
    dict(type='RegLossSwitchHook', begin_ratio=0.9),
    dict(type='ExactResumeHook'),
]

auto_scale_lr = dict(base_batch_size=256)
