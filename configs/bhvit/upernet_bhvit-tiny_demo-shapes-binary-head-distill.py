# The binary-head demo (upernet_bhvit-tiny_demo-shapes-binary-head.py)
# taught pixel by pixel by its full-precision-head counterpart
# (upernet_bhvit-tiny_demo-shapes.py), whose trained checkpoint is required:
#   python tools/demo/run_demo.py --work-dir work_dirs/demo
#   python tools/demo/run_demo.py \
#       --config configs/bhvit/upernet_bhvit-tiny_demo-shapes-binary-head-distill.py \
#       --work-dir work_dirs/demo-binary-head-distill \
#       --cfg-options model.teacher_checkpoint=work_dirs/demo/iter_300.pth
# The checkpoint it writes has the keys of the binary-head config (the
# teacher is not part of the model): test and deploy with that config.
_base_ = ['./upernet_bhvit-tiny_demo-shapes-binary-head.py']
model = dict(
    type='DistillEncoderDecoder',
    teacher='{{ fileDirname }}/upernet_bhvit-tiny_demo-shapes.py',
    teacher_checkpoint=None,
    distill_weight=1.0,
    temperature=1.0)
