# fpn_bhvit_ade20k-binary-head.py (binary neck and head) trained with its
# full-precision-head counterpart (fpn_bhvit_ade20k.py, trained first) as a
# pixel-wise distillation teacher (DistillEncoderDecoder):
#   python tools/train.py configs/bhvit/fpn_bhvit_ade20k-binary-head-distill.py \
#       --cfg-options model.teacher_checkpoint=work_dirs/fpn_bhvit_ade20k/iter_80000.pth \
#                     model.backbone.init_cfg.checkpoint=PATH
# The checkpoint has the keys of fpn_bhvit_ade20k-binary-head.py: test and
# deploy with that config.
_base_ = ['./fpn_bhvit_ade20k-binary-head.py']
model = dict(
    type='DistillEncoderDecoder',
    teacher='{{ fileDirname }}/fpn_bhvit_ade20k.py',
    teacher_checkpoint=None,
    distill_weight=1.0,
    temperature=1.0)
