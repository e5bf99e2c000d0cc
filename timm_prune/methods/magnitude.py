"""Magnitude pruning: the baseline a user would otherwise reach for (``torch.nn.utils.prune``-style L1).

Training is plain (no re-parametrisation, no penalty); ``prune()`` zeroes the smallest ``|w|`` per layer
(``scope="layer"``) or under one global threshold (``scope="global"``). Mean recovery and BatchNorm
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
