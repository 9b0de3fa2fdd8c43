# BHViT-small with full-precision patch merging (the official --some-fp);
# otherwise as bhvit-small_2xb128_in1k.py. Reported top-1 (paper): 70.1.
_base_ = ['./bhvit-small_2xb128_in1k.py']

model = dict(backbone=dict(binary_merge=False))
