# BHViT-small classifier: backbone (last stage, final norm) + global average
# pooling + linear head, the structure of the official classifier (its
# converted weights give the same logits). Plain: no teacher; the training
# configs in configs/bhvit/ turn it into a DistillImageClassifier.
model = dict(
    type='ImageClassifier',
    backbone=dict(
        type='BHViT',
        arch='small',
        img_size=224,
        attn_binarizer='lsq',
        binary_merge=False,
        shift3=True,
        shift5=True,
        recu=False,
        weight_bits=1,
        act_bits=1,
        drop_path_rate=0.,
        out_indices=(3, ),
        final_norm=True),
    neck=dict(type='GlobalAveragePooling'),
    head=dict(
        type='LinearClsHead',
        num_classes=1000,
        in_channels=512,
        loss=dict(type='CrossEntropyLoss', loss_weight=1.0),
        topk=(1, 5),
    ))
