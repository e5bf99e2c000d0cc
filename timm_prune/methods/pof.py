"""POF: hyperspherical layers and a polarizing penalty (after "Pruning On-the-Fly", arXiv 2212.12651).

Our formulation (the paper is known to us by its abstract only; every choice is a switch):

- Each targeted layer's weight is re-parametrised per output unit as ``w = g * v / ||v||``
  (``torch.nn.utils.parametrize``; the module keeps its class and forward). ``g`` starts at ``||w||``,
  so conversion does not change the outputs, and ``u = v / ||v||`` lives on the unit sphere.
- The candidates are the entries pruning would remove now: per layer the ``sparsity`` fraction with the
  smallest ``|u|`` (``criterion="direction"``) or ``|w|`` (``criterion="weight"``); with
  ``scope="global"`` one threshold on the effective weights ``|w|`` (directions of layers with different
  fan-in are not comparable).
- The penalty is the energy of the candidates, ``sum(u**2 over candidates)`` averaged over output units,
  averaged over layers, times ``penalty_weight``. Each unit's ``u`` has norm 1, so draining the candidates
  pushes the kept entries away from zero: the weights polarise. The candidates are re-selected every
  ``threshold_refresh`` training calls; the weight ramps up linearly over ``penalty_warmup`` calls.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from .base import PruneMethod, is_int
from .registry import register_method

_EPS = 1e-12


def _unit_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(_EPS).view((v.shape[0],) + (1,) * (v.dim() - 1))


class Hyperspherical(nn.Module):
    """``(g, v) -> g * v / ||v||`` per output unit; ``g`` is 1-D (one magnitude per unit)."""

    def forward(self, magnitude: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        shape = (direction.shape[0],) + (1,) * (direction.dim() - 1)
        return magnitude.view(shape) * direction / _unit_norm(direction)

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        magnitude = weight.reshape(weight.shape[0], -1).norm(dim=1)
        return magnitude, weight.clone()


@dataclass
class PofOptions:
    """Fields of ``PruneConfig(method="pof", ...)``."""

    # Training calls of penalty() over which its weight ramps linearly from 0 to penalty_weight.
    penalty_warmup: int = 0
    # Re-select the candidate set every this many training calls (1: every step).
    threshold_refresh: int = 1
    # Per-layer ranking: "direction" (|u|, each unit on equal footing) or "weight" (|g * u|).
    criterion: str = "direction"

    def __post_init__(self) -> None:
        if not is_int(self.penalty_warmup) or self.penalty_warmup < 0:
            raise ValueError(f"PruneConfig.penalty_warmup must be an integer >= 0; got {self.penalty_warmup!r}")
        if not is_int(self.threshold_refresh) or self.threshold_refresh < 1:
            raise ValueError(f"PruneConfig.threshold_refresh must be an integer >= 1; got {self.threshold_refresh!r}")
        if self.criterion not in ("direction", "weight"):
            raise ValueError(f"PruneConfig.criterion must be 'direction' or 'weight'; got {self.criterion!r}")


@register_method("pof")
class PofMethod(PruneMethod):
    options_cls = PofOptions
    # The penalty is a mean of per-unit energy fractions, small next to a task loss; 300 polarised the default
    # recipe's ResNet-10t (70 %: pruned 98.3 % vs 50.8 % at weight 20, same dense accuracy). Issue 5 re-tunes it.
    default_penalty_weight = 300.0

    def __init__(self, config) -> None:
        super().__init__(config)
        # Training calls of penalty() so far: a buffer so that checkpoints resume the warm-up and refresh.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # Whether the candidate buffers below hold a selection yet.
        self.register_buffer("candidates_selected", torch.zeros((), dtype=torch.bool))

    def attach(self, layers: dict[str, nn.Module]) -> None:
        super().attach(layers)
        for index, module in enumerate(layers.values()):
            # The current candidate set is state, not a cache: between refreshes it decides the penalty, so a
            # resumed run must get it back from the checkpoint to continue exactly.
            self.register_buffer(f"candidates_{index}", torch.zeros_like(module.weight, dtype=torch.bool))
            parametrize.register_parametrization(module, "weight", Hyperspherical())

    @property
    def _candidates(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"candidates_{index}") for index, name in enumerate(self.layers)}

    def direction(self, name: str) -> torch.Tensor:
        return self.layers[name].parametrizations.weight.original1

    def scores(self, name: str) -> torch.Tensor:
        if self.config.scope == "layer" and self.config.criterion == "direction":
            v = self.direction(name).detach().float()
            return (v / _unit_norm(v)).abs()
        return super().scores(name)

    def current_weight(self) -> float:
        warmup = self.config.penalty_warmup
        ramp = 1.0 if warmup == 0 else min(1.0, float(self.step) / warmup)
        return self.config.penalty_weight * ramp

    def penalty(self) -> torch.Tensor:
        training = torch.is_grad_enabled()
        weight = self.current_weight()
        if not self.candidates_selected or (training and int(self.step) % self.config.threshold_refresh == 0):
            with torch.no_grad():
                for name, keep in self.keep_masks().items():
                    self._candidates[name].copy_(~keep)
            self.candidates_selected.fill_(True)
        if training:
            self.step += 1
        # Always float32: the energy is a sum of many small squares, which bf16 would round away.
        device_type = self.direction(next(iter(self.layers))).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            energies = []
            for name, candidates in self._candidates.items():
                v = self.direction(name).float()
                u = v / _unit_norm(v)
                per_unit = (u.square() * candidates).reshape(u.shape[0], -1).sum(1)
                energies.append(per_unit.mean())
            return weight * torch.stack(energies).mean()
