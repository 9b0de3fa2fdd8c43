# BHViT-tiny + Semantic FPN, RS-LVF with 4 bands (R, G, B, near infrared),
# 512x512 crops, 80k iterations, 8x2. Convert the scenes keeping the four
# bands in this order, e.g.
#   python tools/dataset_converters/rs_lvf.py RAW data/rs_lvf \
#       --classes RAW/classes.json --bands 1,2,3,4
# An ImageNet (RGB) checkpoint fits a 4-band stem with
#   --cfg-options model.backbone.init_cfg.checkpoint=PATH
# (init_cfg.expand_bands below: see docs/remote_sensing.md).
_base_ = './fpn_bhvit-tiny_rs-lvf.py'
bands = 4
# Every band is on LoadRSImage's 0..255 scale (bands.json): R, G, B keep
# ImageNet's statistics (what an RGB-pretrained stem expects); the near
# infrared band, stretched between its 2nd and 98th percentiles, is centred
# on the middle of the range. For exact standardisation put the band's
# "mean"/"std" from data/rs_lvf/bands.json here.
data_preprocessor = dict(
    mean=[123.675, 116.28, 103.53, 127.5],
    std=[58.395, 57.12, 57.375, 63.75],
    bgr_to_rgb=False)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(
        in_channels=bands,
        init_cfg=dict(expand_bands='mean')))
