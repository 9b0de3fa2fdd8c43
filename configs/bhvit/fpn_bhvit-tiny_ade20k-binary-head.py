# BHViT-tiny + Semantic FPN with a binary FPN neck and head (those of
# fpn_bhvit_ade20k-binary-head.py on the tiny backbone), ADE20K, 512x512
# crops, 80k iterations, 8 GPUs x 2 images.
_base_ = './fpn_bhvit_ade20k-binary-head.py'
model = dict(backbone=dict(arch='tiny'))
