# BHViT-tiny + UPerNet, RS-LVF, 512x512 crops, 160k iterations, 8x2.
_base_ = './upernet_bhvit_rs-lvf.py'
model = dict(backbone=dict(arch='tiny'))
