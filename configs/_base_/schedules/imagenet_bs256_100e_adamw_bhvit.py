# The BHViT schedule: AdamW, lr 5e-4 for a total batch of 256 (2 GPUs x 128),
# no weight decay, 100 epochs of cosine decay without warm-up.
optim_wrapper = dict(
    optimizer=dict(
        type='AdamW',
        lr=5e-4,
        weight_decay=0.,
        betas=(0.9, 0.999),
        eps=1e-8))

param_scheduler = [
    # per-epoch cosine decay (the official timm scheduler steps per epoch)
    dict(type='CosineAnnealingLR', by_epoch=True, begin=0, end=100,
         T_max=100, eta_min=0.)
]

train_cfg = dict(by_epoch=True, max_epochs=100, val_interval=1)
val_cfg = dict()
test_cfg = dict()

# lr 5e-4 is for 2 x 128 images; `--auto-scale-lr` rescales it to the
# actual total batch size.
auto_scale_lr = dict(base_batch_size=256)
