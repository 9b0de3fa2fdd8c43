# BHViT-tiny with full-precision patch merging; recipe of
# bhvit-small_2xb128_in1k.py. Reported top-1 (paper): 66.0.
_base_ = ['./bhvit-small_2xb128_in1k.py']

model = dict(backbone=dict(arch='tiny', binary_merge=False))
