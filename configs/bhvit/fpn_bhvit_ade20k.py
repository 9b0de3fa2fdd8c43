# BHViT-small + Semantic FPN, ADE20K, 512x512 crops, 80k iterations,
# 8 GPUs x 2 images. ImageNet-pretrained backbone:
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
_base_ = [
    '../_base_/models/fpn_bhvit.py', '../_base_/datasets/ade20k.py',
    '../_base_/default_runtime.py', '../_base_/schedules/schedule_80k.py'
]
custom_imports = dict(imports=['mmbhvit'], allow_failed_imports=False)
crop_size = (512, 512)
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(arch='small'),
    decode_head=dict(num_classes=150))

# 8 GPUs x 2 images per GPU (total batch 16)
train_dataloader = dict(batch_size=2)
val_dataloader = dict(batch_size=1)
test_dataloader = val_dataloader
