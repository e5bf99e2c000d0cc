"""Tiny configurations of timm architectures from many families, shared by the core tests.

Each entry: (model name, create_model kwargs that shrink it, input size). timm's test_* models are used
where they exist; otherwise width/depth/img_size are cut down so the whole table runs in seconds.
"""

ZOO = [
    # CNNs
    ("test_resnet", {}, 32),
    ("resnext26ts", {}, 32),
    ("test_byobnet", {}, 32),
    ("regnetx_002", {}, 32),
    ("test_efficientnet", {}, 32),
    ("test_efficientnet_evos", {}, 32),
    ("tf_mobilenetv3_small_minimal_100", {}, 32),  # TF "same" padding: Conv2dSame
    ("mobilenetv2_050", {}, 32),
    ("mobilenetv3_small_050", {}, 32),
    ("ghostnet_050", {}, 32),
    ("rexnet_100", {}, 32),
    ("densenet121", {"growth_rate": 8}, 32),
    ("hgnetv2_b0", {}, 32),
    ("test_convnext", {}, 32),
    ("convmixer_768_32", {}, 32),  # padding="same" depthwise convs
    ("repvgg_a0", {}, 32),
    ("test_mambaout", {}, 64),
    # hybrids
    ("mobilevit_xxs", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("efficientformerv2_s0", {"img_size": 64}, 64),
    ("fastvit_t8", {}, 64),
    ("efficientvit_b0", {}, 64),
    ("levit_128s", {"img_size": 64}, 64),
    ("test_maxvit", {}, 160),
    ("test_coatnet", {}, 160),
    # transformers and MLPs
    ("test_vit", {}, 160),
    ("test_vit_relpos", {}, 160),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32}, 32),  # two classifiers: head, head_dist
    ("eva02_tiny_patch14_224", {"img_size": 28}, 28),
    ("swin_tiny_patch4_window7_224", {"img_size": 56, "embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2)}, 56),
    ("mixer_s32_224", {"img_size": 64}, 64),
    ("poolformer_s12", {}, 32),
]
