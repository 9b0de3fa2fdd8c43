# BHViT-tiny, binary patch merging; recipe of bhvit-small_2xb128_in1k.py.
# Reported top-1 (paper): 64.0.
_base_ = ['./bhvit-small_2xb128_in1k.py']

model = dict(backbone=dict(arch='tiny', binary_merge=True))
