"""Magnitude pruning: the baseline a user would otherwise reach for (``torch.nn.utils.prune``-style L1).

Training is plain (no re-parametrisation, no penalty); ``prune()`` zeroes the smallest ``|w|`` per layer
(``scope="layer"``), under one global threshold (``scope="global"``), or under one threshold on each layer's LAMP
scores (``scope="lamp"``, Lee et al., ICLR 2021: layer-adaptive, no layer emptied). Mean recovery and BatchNorm
re-estimation apply as for every unstructured method, so the same trained model can be compared with POF
variant for variant.
"""

from __future__ import annotations

from ..registry import register_method
from .base import PruneMethod


@register_method("magnitude")
class MagnitudeMethod(PruneMethod):
    # No penalty: the model trains exactly as it would without timm_prune.
    default_penalty_weight = 0.0
    scopes = ("layer", "global", "lamp")
    # LAMP (benchmark v2, 3 seeds): on the trained ResNet 0.8 / 2.2 points behind one global threshold at 90 / 95 %
    # with BatchNorm re-estimated, where per layer is 27 / 48 behind; on ConvNeXt one global threshold empties the
    # last stage (34 points behind LAMP at 90 %).
    default_scope = "lamp"
