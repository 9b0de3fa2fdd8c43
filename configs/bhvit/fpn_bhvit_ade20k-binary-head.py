# BHViT-small + Semantic FPN with a binary FPN head (the 3x3 convolutions of
# every scale head binary; conv_seg full precision) and a binary FPN neck
# (its 3x3 fpn_convs binary, 1x1 laterals full precision: with a binary head
# alone the neck's 3x3 convs would be most of the segmentor's OPs), ADE20K,
# 512x512 crops, 80k iterations, 8 GPUs x 2 images.
_base_ = ['./fpn_bhvit_ade20k.py']
model = dict(
    neck=dict(
        type='BinaryFPN', weight_bits=1, act_bits=1,
        block_norm_cfg={{_base_.norm_cfg}}),
    decode_head=dict(type='BinaryFPNHead', weight_bits=1, act_bits=1))
