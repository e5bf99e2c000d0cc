"""Wanda: prune by weights and activations, no training (Sun, Liu, Bair & Kolter 2023, arXiv 2306.11695).

Score of weight ``W[i, j]``: ``|W[i, j]| * ||X_j||``, with ``X_j`` the j-th input feature of the layer over the
calibration images (for a Conv2d, j is an (input channel, kh, kw) entry of the unfolded receptive field, per conv
group; ``oneshot.capture``). ``calibrate(batches)`` takes ``calibration_batches`` batches and gathers the feature
norms of every targeted layer in one forward pass (no gradients, eval mode, every hook removed afterwards); then
``prune()`` masks:

- ``scope="layer"``: per output row, as in the paper: every row (output unit) loses the same fraction, its
  lowest-scored weights;
- ``scope="global"``: one threshold over the scores of all layers, with the norms as root mean squares over the
  rows (``FeatureNorms.norms``) so that layers with different numbers of positions per image compare;
- ``pattern="N:M"``: the lowest ``M - N`` of every group of M input channels (``oneshot.nm``).

No weight changes besides the zeros: mean recovery and BatchNorm re-estimation apply after it as after magnitude
pruning. A targeted layer that never runs on the calibration batches is ranked by ``|W|`` (a warning names it).
"""

from __future__ import annotations

import itertools
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..oneshot.capture import FeatureNorms, capture_all
from ..oneshot.wanda import row_keep_mask, wanda_scores
from ..registry import register_method
from .base import PruneMethod, is_int, split_batch


def check_calibration_batches(value: Any) -> None:
    if not is_int(value) or value < 1:
        raise ValueError(f"PruneConfig.calibration_batches must be an integer >= 1; got {value!r}")


def take_batches(batches: Iterable[Any], count: int) -> list[Any]:
    """The first ``count`` batches of ``batches`` (which may be endless, like the recipe's); at least one."""
    taken = list(itertools.islice(iter(batches), count))
    if not taken:
        raise ValueError("calibrate(batches): `batches` yielded nothing; one-shot methods need calibration images")
    return taken


def calibration_forward(model: nn.Module, batch: Any) -> Any:
    """``model(inputs)`` for any batch ``split_batch`` understands, moved to the model's device."""
    device = next(model.parameters()).device
    return model(split_batch(batch)[0].to(device))


@dataclass
class WandaOptions:
    """Fields of ``PruneConfig(method="wanda", ...)``."""

    # Batches of calibration images read by calibrate() (the recipe's batch size; the paper used 128 sequences).
    calibration_batches: int = 8

    def __post_init__(self) -> None:
        check_calibration_batches(self.calibration_batches)


@register_method("wanda")
class WandaMethod(PruneMethod):
    options_cls = WandaOptions
    # No penalty: the model trains (if at all) exactly as it would without timm_prune.
    default_penalty_weight = 0.0
    needs_calibration = True

    def __init__(self, config: Any, model: nn.Module) -> None:
        super().__init__(config, model)
        # Per layer, the (groups, columns) root-mean-square input-feature norms; empty until calibrate().
        self.feature_norms: dict[str, torch.Tensor] = {}
        self.calibrated = False

    def calibrate(self, batches: Iterable[Any], **kwargs: Any) -> dict[str, Any]:
        taken = take_batches(batches, self.config.calibration_batches)
        stats = capture_all(
            self.model, self.layers, taken, stats_factory=lambda n, m: FeatureNorms(m), forward=calibration_forward
        )
        self.feature_norms = {name: s.norms() for name, s in stats.items()}
        unreached = [name for name in self.layers if name not in stats]
        if unreached:
            warnings.warn(
                f"wanda: {len(unreached)} targeted layer(s) never ran on the calibration batches and are ranked by "
                f"|W|: {', '.join(unreached[:8])}{' ...' if len(unreached) > 8 else ''}",
                stacklevel=2,
            )
        self.calibrated = True
        images = sum(int(split_batch(b)[0].shape[0]) for b in taken)
        return {"calibration_batches": len(taken), "calibration_images": images, "unreached_layers": len(unreached)}

    def _require_calibration(self) -> None:
        if not self.calibrated:
            raise RuntimeError("wanda ranks weights by their input activations: call pm.calibrate(batches) first")

    def scores(self, name: str) -> torch.Tensor:
        self._require_calibration()
        weight = self.weight(name).detach()
        norms = self.feature_norms.get(name)
        return weight.abs().float() if norms is None else wanda_scores(weight, norms)

    def candidate_energy(self) -> dict[str, float]:
        # Before calibration there are no scores, hence no candidate set to report.
        return super().candidate_energy() if self.calibrated else {}

    def keep_masks(self, sparsity: float | None = None) -> dict[str, torch.Tensor]:
        """Per output row at layer scope (the paper's comparison group); global scope and N:M as in ``base``."""
        self._require_calibration()
        if self.config.pattern is not None or self.config.scope == "global":
            return super().keep_masks(sparsity)
        sparsity = self.config.sparsity if sparsity is None else sparsity
        return {name: row_keep_mask(self.scores(name), sparsity) for name in self.layers}
