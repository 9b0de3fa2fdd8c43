# BHViT-tiny + Semantic FPN, ADE20K, 512x512 crops, 80k iterations, 8x2.
_base_ = './fpn_bhvit_ade20k.py'
model = dict(backbone=dict(arch='tiny'))
