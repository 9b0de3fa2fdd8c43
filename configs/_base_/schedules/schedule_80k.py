# 80k iterations, AdamW, linear warm-up then poly decay (Semantic FPN, as
# PVT / Twins train it in mmseg: lr 1e-4, poly power 0.9). Otherwise as
# schedule_160k.py (same no-decay policy, hooks and loops).
_base_ = ['./schedule_160k.py']
optimizer = dict(lr=1e-4)
optim_wrapper = dict(optimizer=optimizer)
param_scheduler = [
    dict(
        type='LinearLR', start_factor=1e-6, by_epoch=False, begin=0,
        end=1500),
    dict(
        type='PolyLR',
        eta_min=0.0,
        power=0.9,
        begin=1500,
        end=80000,
        by_epoch=False)
]
train_cfg = dict(max_iters=80000, val_interval=8000)
default_hooks = dict(checkpoint=dict(interval=8000))
