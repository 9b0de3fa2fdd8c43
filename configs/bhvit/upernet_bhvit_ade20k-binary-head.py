# BHViT-small + UPerNet with a binary head (3x3 convolutions binary: PSP
# bottleneck, fpn_convs, fpn_bottleneck; 1x1 laterals / PPM convs (ending
# with BN, no ReLU) and conv_seg full precision), ADE20K, 512x512 crops,
# 160k iterations, 8 GPUs x 2 images. The auxiliary FCN head (training
# only) stays full precision.
_base_ = ['./upernet_bhvit_ade20k.py']
model = dict(
    decode_head=dict(
        type='BinaryUPerHead', weight_bits=1, act_bits=1,
        binary_laterals=False, lateral_act=False))
