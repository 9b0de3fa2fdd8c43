# The demo (BHViT-tiny + slim UPerNet on "demo shapes") with a binary
# UPerNet head: its 3x3 convolutions (PSP bottleneck, fpn_convs,
# fpn_bottleneck) are BinaryConvBlocks; the 1x1 laterals / PPM convs (ending
# with BN, no ReLU, as they feed signs) and the classifier conv_seg stay full
# precision. Same schedule as the fp32 head:
#   python tools/demo/run_demo.py \
#       --config configs/bhvit/upernet_bhvit-tiny_demo-shapes-binary-head.py \
#       --work-dir work_dirs/demo-binary-head [--iters 1200]
# mIoU gap to the fp32 head trained alike: 1.3 at 300 iterations, 0.42-0.48
# at 1200 (configs/bhvit/README.md, "Binary heads").
_base_ = ['./upernet_bhvit-tiny_demo-shapes.py']
model = dict(
    decode_head=dict(
        type='BinaryUPerHead', weight_bits=1, act_bits=1,
        binary_laterals=False, lateral_act=False))
