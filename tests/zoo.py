"""Tiny configurations of timm architectures from many families, shared by the core tests.

Each entry: (model name, create_model kwargs that shrink it, input size). timm's test_* models are used
where they exist; otherwise depth/width/img_size are cut down through kwargs, or, where a timm entrypoint
fixes its sizes, a tiny variant is registered below with timm's own builder (so ``timm.create_model``
works with the name, as the merge tests need).
"""

import torch.nn as nn
from timm.layers import GroupNorm1
from timm.models import register_model
from timm.models.convmixer import _create_convmixer
from timm.models.metaformer import _create_metaformer
from timm.models.mlp_mixer import _create_mixer


@register_model
def zoo_convmixer_tiny(pretrained: bool = False, **kwargs):
    args = dict(dim=32, depth=2, kernel_size=5, patch_size=4)
    return _create_convmixer("convmixer_768_32", pretrained, **args, **kwargs)


@register_model
def zoo_mixer_tiny(pretrained: bool = False, **kwargs):
    args = dict(patch_size=16, num_blocks=2, embed_dim=64)
    return _create_mixer("mixer_s16_224", pretrained, **args, **kwargs)


@register_model
def zoo_poolformer_tiny(pretrained: bool = False, **kwargs):
    # poolformer_s12's settings (pooling token mixer, GroupNorm, layer scale) at a fraction of the size.
    args = dict(
        depths=(1, 1, 1, 1),
        dims=(16, 32, 48, 64),
        downsample_norm=None,
        mlp_act=nn.GELU,
        mlp_bias=True,
        norm_layers=GroupNorm1,
        layer_scale_init_values=1e-5,
        res_scale_init_values=None,
        use_mlp_head=False,
    )
    return _create_metaformer("poolformer_s12", pretrained, **args, **kwargs)


ZOO = [
    # CNNs
    ("test_resnet", {}, 32),
    ("test_byobnet", {}, 32),  # grouped 3x3 convs, SE
    ("regnetx_002", {}, 32),  # grouped convs
    ("test_efficientnet", {}, 32),
    ("test_efficientnet_evos", {}, 32),
    ("tf_mobilenetv3_small_minimal_100", {}, 32),  # TF "same" padding: Conv2dSame
    ("mobilenetv2_050", {}, 32),
    ("mobilenetv3_small_050", {}, 32),
    ("ghostnet_050", {}, 32),
    ("rexnet_100", {"width_mult": 0.5}, 32),
    ("densenet121", {"growth_rate": 8}, 32),  # concatenations
    ("hgnetv2_b0", {}, 32),
    ("test_convnext", {}, 32),
    ("zoo_convmixer_tiny", {}, 32),  # padding="same" depthwise convs
    ("repvgg_a0", {}, 32),
    ("test_mambaout", {}, 64),
    # hybrids
    ("mobilevit_xxs", {}, 64),
    ("edgenext_xx_small", {}, 64),
    ("efficientformerv2_s0", {"img_size": 64, "depths": (1, 1, 1, 1)}, 64),
    ("fastvit_t8", {"layers": (1, 1, 1, 1)}, 64),
    ("efficientvit_b0", {"depths": (1, 1, 1, 1, 1)}, 64),
    ("levit_128s", {"img_size": 64, "depth": (1, 1, 1)}, 64),
    ("test_maxvit", {}, 160),
    ("test_coatnet", {}, 160),
    # transformers and MLPs
    ("test_vit", {"img_size": 32}, 32),
    ("test_vit_relpos", {"img_size": 32}, 32),
    ("deit_tiny_distilled_patch16_224", {"img_size": 32, "depth": 2}, 32),  # two classifiers
    ("eva02_tiny_patch14_224", {"img_size": 28, "depth": 2}, 28),
    (
        "swin_tiny_patch4_window7_224",
        {"img_size": 56, "embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 1, 2, 2)},
        56,
    ),
    ("zoo_mixer_tiny", {"img_size": 64}, 64),
    ("zoo_poolformer_tiny", {}, 32),
]
