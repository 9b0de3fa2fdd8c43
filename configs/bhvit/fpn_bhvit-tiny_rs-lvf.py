# BHViT-tiny + Semantic FPN, RS-LVF, 512x512 crops, 80k iterations, 8x2.
_base_ = './fpn_bhvit_rs-lvf.py'
model = dict(backbone=dict(arch='tiny'))
