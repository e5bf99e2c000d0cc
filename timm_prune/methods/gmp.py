"""GMP: gradual magnitude pruning during training (Zhu & Gupta, "To prune, or not to prune", arXiv 1710.01878).

The classic sparse-training reference. Training is plain (no re-parametrisation, no penalty); every
``update_every`` optimizer steps between ``start_fraction`` and ``end_fraction`` of the run, the smallest ``|w|``
(per layer, or under one global threshold with ``scope="global"``) are zeroed, at the sparsity of the cubic
schedule

    s_t = s_f + (s_i - s_f) * (1 - (t - t_0) / (t_1 - t_0)) ** 3

from ``initial_sparsity`` s_i to ``sparsity`` s_f. Between updates the masks hold: after every optimizer step the
pruned entries are set back to zero, so the forward pass never sees them (the same effect as multiplying by the
mask in the graph, as the paper's implementation does, without touching the layers). After ``t_1`` the masks are
fixed and the rest of the run trains the sparse model. One trained model serves one sparsity: ``prune()`` keeps the
final masks (the zeros rank lowest by magnitude).

The training loop calls ``pm.on_step_end(step=..., total_steps=...)`` after each optimizer step (the recipe does).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from ..registry import register_method
from .base import PruneMethod, is_int, is_number
from .schedules import cubic_sparsity


@dataclass
class GmpOptions:
    """Fields of ``PruneConfig(method="gmp", ...)``."""

    # Sparsity of the first pruning step (the schedule starts here and ends at ``sparsity``).
    initial_sparsity: float = 0.0
    # Where the schedule starts and ends, as fractions of the run's optimizer steps. The paper leaves the last
    # part of training to recover at the final sparsity.
    start_fraction: float = 0.0
    end_fraction: float = 0.75
    # Optimizer steps between mask updates (the paper's Delta t).
    update_every: int = 10

    def __post_init__(self) -> None:
        if not is_number(self.initial_sparsity) or not 0.0 <= self.initial_sparsity < 1.0:
            raise ValueError(f"PruneConfig.initial_sparsity must be a number in [0, 1); got {self.initial_sparsity!r}")
        for name in ("start_fraction", "end_fraction"):
            value = getattr(self, name)
            if not is_number(value) or not 0.0 <= value <= 1.0:
                raise ValueError(f"PruneConfig.{name} must be a number in [0, 1]; got {value!r}")
        if self.start_fraction >= self.end_fraction:
            raise ValueError(
                f"PruneConfig.start_fraction ({self.start_fraction}) must be below end_fraction ({self.end_fraction})"
            )
        if not is_int(self.update_every) or self.update_every < 1:
            raise ValueError(f"PruneConfig.update_every must be an integer >= 1; got {self.update_every!r}")


@register_method("gmp")
class GmpMethod(PruneMethod):
    options_cls = GmpOptions
    default_penalty_weight = 0.0
    scopes = ("layer", "global", "lamp")

    def attach(self, layers: dict[str, torch.nn.Module]) -> None:
        super().attach(layers)
        # One keep-mask per layer as a buffer: it travels with checkpoints, so a resumed run holds the same zeros.
        for index, module in enumerate(layers.values()):
            self.register_buffer(f"keep_{index}", torch.ones_like(module.weight, dtype=torch.bool))
        self.register_buffer("current_sparsity", torch.zeros((), dtype=torch.float64))

    def _keep_buffers(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"keep_{index}") for index, name in enumerate(self.layers)}

    @torch.no_grad()
    def on_step_end(self, step: int | None = None, total_steps: int | None = None, **logs: Any) -> dict:
        if step is None or total_steps is None:
            raise ValueError("gmp needs pm.on_step_end(step=..., total_steps=...) after every optimizer step")
        options = self.config.method_options
        if step % options.update_every == 0 or step >= options.end_fraction * total_steps:
            target = cubic_sparsity(
                step,
                total_steps,
                options.initial_sparsity,
                self.config.sparsity,
                options.start_fraction,
                options.end_fraction,
            )
            if target > float(self.current_sparsity) + 1e-9:
                for name, keep in self.keep_masks(target).items():
                    self._keep_buffers()[name].copy_(keep)
                self.current_sparsity.fill_(target)
        for name, keep in self._keep_buffers().items():
            self.layers[name].weight.mul_(keep)
        return {"gmp/sparsity": float(self.current_sparsity)}
