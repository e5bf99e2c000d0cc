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
    # LAMP: on the trained ResNet it is within 0.7 / 2.8 points of one global threshold at 90 / 95 % with BatchNorm
    # re-estimated, and far ahead per layer; on ConvNeXt one global threshold empties the last stage (benchmark v2).
    default_scope = "lamp"
