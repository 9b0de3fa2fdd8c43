# BHViT-tiny + UPerNet with a binary head (the head of
# upernet_bhvit_ade20k-binary-head.py on the tiny backbone), ADE20K,
# 512x512 crops, 160k iterations, 8 GPUs x 2 images.
_base_ = './upernet_bhvit_ade20k-binary-head.py'
model = dict(backbone=dict(arch='tiny'))
