# upernet_bhvit_ade20k-binary-head.py trained with its full-precision-head
# counterpart (upernet_bhvit_ade20k.py, trained first) as a pixel-wise
# distillation teacher (DistillEncoderDecoder). Both teacher and student
# start from the same ImageNet BHViT-small backbone checkpoint:
#   python tools/train.py configs/bhvit/upernet_bhvit_ade20k-binary-head-distill.py \
#       --cfg-options model.teacher_checkpoint=work_dirs/upernet_bhvit_ade20k/iter_160000.pth \
#                     model.backbone.init_cfg.checkpoint=PATH
# The checkpoint has the keys of upernet_bhvit_ade20k-binary-head.py (the
# teacher is not part of the model): test and deploy with that config.
_base_ = ['./upernet_bhvit_ade20k-binary-head.py']
model = dict(
    type='DistillEncoderDecoder',
    teacher='{{ fileDirname }}/upernet_bhvit_ade20k.py',
    teacher_checkpoint=None,
    distill_weight=1.0,
    temperature=1.0)
