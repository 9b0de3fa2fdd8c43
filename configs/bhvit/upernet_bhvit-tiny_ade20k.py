# BHViT-tiny + UPerNet, ADE20K, 512x512 crops, 160k iterations, 8x2.
_base_ = './upernet_bhvit_ade20k.py'
model = dict(backbone=dict(arch='tiny'))
