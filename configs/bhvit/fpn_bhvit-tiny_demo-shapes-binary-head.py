# The demo's Semantic FPN with the binary neck and head of
# fpn_bhvit_ade20k-binary-head.py (3x3 fpn_convs and scale-head convolutions
# binary; 1x1 laterals and conv_seg full precision), trained as
# fpn_bhvit-tiny_demo-shapes.py (its full-precision reference):
#   python tools/demo/run_demo.py \
#       --config configs/bhvit/fpn_bhvit-tiny_demo-shapes-binary-head.py \
#       --work-dir work_dirs/demo-fpn-binary-head [--iters 1200]
_base_ = ['./fpn_bhvit-tiny_demo-shapes.py']
model = dict(
    neck=dict(
        type='BinaryFPN', weight_bits=1, act_bits=1,
        block_norm_cfg={{_base_.norm_cfg}}),
    decode_head=dict(type='BinaryFPNHead', weight_bits=1, act_bits=1))
