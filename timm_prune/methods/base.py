"""The shape every pruning method has.

A method is an ``nn.Module`` child of ``PrunableModel`` (so its buffers and parameters, e.g. step counters
or gates, travel with ``state_dict`` and Accelerate checkpoints). It holds plain references to the targeted
layers, never registers them as children, and answers four questions:

- ``attach``: how to re-parametrise the targeted layers (once, at ``convert`` time);
- ``penalty``: the training penalty, a 0-dim tensor;
- ``scores``: how to rank a layer's weights for pruning at the configured scope;
- ``candidate_energy``: how much of each layer's energy pruning now would remove (for logs).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from ..masking import global_keep_masks, layer_keep_mask
from ..parametrizations import unmasked_weight

if TYPE_CHECKING:
    from ..config import PruneConfig


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: what numeric option fields accept."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


@dataclass
class NoOptions:
    """This method has no fields of its own."""


class PruneMethod(nn.Module):
    name: ClassVar[str] = ""
    options_cls: ClassVar[type] = NoOptions
    # PruneConfig.penalty_weight when the user gives none.
    default_penalty_weight: ClassVar[float] = 1.0
    # Structured methods remove whole channels in ``prune_structured`` instead of masking weights.
    structured: ClassVar[bool] = False

    def __init__(self, config: PruneConfig) -> None:
        super().__init__()
        self.config = config
        # Plain dict on purpose: the layers belong to the wrapped model, not to the method.
        self.__dict__["layers"] = {}

    @property
    def layers(self) -> dict[str, nn.Module]:
        return self.__dict__["layers"]

    def attach(self, layers: dict[str, nn.Module]) -> None:
        self.layers.update(layers)

    def weight(self, name: str) -> torch.Tensor:
        """The layer's weight before masking, as the method parametrises it."""
        return unmasked_weight(self.layers[name])

    def scores(self, name: str) -> torch.Tensor:
        """Non-negative ranking scores, shaped like the weight; lowest are pruned first. Default: |w|."""
        return self.weight(name).detach().abs()

    def keep_masks(self, sparsity: float | None = None) -> dict[str, torch.Tensor]:
        """Keep-masks at ``sparsity`` (default ``config.sparsity``) and ``config.scope`` for the current weights."""
        sparsity = self.config.sparsity if sparsity is None else sparsity
        names = list(self.layers)
        if self.config.scope == "global":
            masks = global_keep_masks([lambda n=n: self.scores(n) for n in names], sparsity)
            return dict(zip(names, masks, strict=True))
        return {n: layer_keep_mask(self.scores(n), sparsity) for n in names}

    def penalty(self) -> torch.Tensor:
        device = next(iter(self.layers.values())).weight.device
        return torch.zeros((), device=device)

    def prune_structured(self):
        """Structured methods: remove channels and return a report (called by ``PrunableModel.prune``)."""
        raise NotImplementedError(f"method {self.name!r} is unstructured; it prunes through keep_masks()")

    def on_epoch_end(self, **logs) -> dict:
        """Epoch-boundary update (no-op by default); returns values worth logging."""
        return {}

    def on_step_end(self, **logs) -> dict:
        """After each optimizer step, before ``zero_grad`` (no-op by default); returns values worth logging."""
        return {}

    def candidate_energy(self) -> dict[str, float]:
        """Per layer, the fraction of the weight's energy (sum of squares) that pruning now would remove."""
        out = {}
        with torch.no_grad():
            for name, keep in self.keep_masks().items():
                w2 = self.weight(name).detach().float().square()
                out[name] = float((w2 * ~keep).sum() / w2.sum().clamp_min(1e-30))
        return out
