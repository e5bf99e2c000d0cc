"""AutoBot: trainable bottleneck gates to a FLOPs target, then structured channel removal (arXiv 2111.09635).

Our formulation (after the authors' public code, written anew):

- Channel groups come from torch-pruning's dependency graph: channels coupled by residual adds, concatenations,
  depthwise / grouped convs and the residual stream of ViTs share one gate. Groups are rooted at the targeted
  Conv2d/Linear layers (``target_modules``); a group any of whose output-side layers is not targeted (the stem,
  the classifier) stays whole, and so do the q/k/v outputs of attention modules (head counts never change).
  Each group is tried once on the model (one gate's channels removed, then restored): a group that torch-pruning
  does not remove consistently (Swin-V2-CR's window attention, GhostNet's cheap operations) stays whole, with a
  warning. Patch merging (Swin) has its own rule (``timm_prune.structured.rules``).
- Each group channel ``c`` has a gate ``g_c = sigmoid(alpha_c)``, ``alpha`` initialised so that ``g = gate_init``.
  The gate multiplies channel ``c`` at the input of every conv / linear that consumes it (which is exactly what
  removing it does to those layers).
- ``calibrate(batches)`` (the gate training): weights frozen, model in eval mode, only ``alpha`` trains with
  Adam (``gate_lr``) on ``loss = CE + beta * L_flops + gamma * L_bool`` where ``L_flops`` is
  ``(r - t) / (1 - t)`` above the target ratio ``t`` and ``1 - r / t`` below it, ``r = F(g) / F_dense``,
  ``F(g)`` the FLOPs count with every channel weighted by its gate (differentiable; exact for 0/1 gates), and
  ``L_bool`` the mean over groups of each group's mean ``|g - round(g)|``. Labels come from the batches,
  or, for unlabeled batches, from the dense model's own predictions. The gates with the lowest loss over the
  last 40% of steps are kept.
- ``prune()``: channels are ranked by gate (ties by position) and one global threshold is bisected so that the
  FLOPs of the pruned model are the largest not above the target; each group keeps at least its highest-gated
  channel; removed channels are then given back, highest gate first, while they fit, to land within 0.5% of the
  target (a single threshold moves in whole channels, which can be a few percent of the FLOPs of a small
  model). Channels are then physically removed (torch-pruning), the kept counts are checked against the plan
  and the pruned model must run; any failure restores the model exactly (same module and parameter objects)
  and raises ``StructuredPruneError``. The report gives params, FLOPs (FlopCounterMode, i.e. 2 x MACs) and
  measured CPU latency before and after.

``flops_target`` is a fraction of the dense FLOPs when in (0, 1), else absolute MFLOPs (2 x MACs, per image at
the input size used).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..registry import register_method
from ..structured.gates import attach_gates, with_constant
from ..structured.measure import refill
from .base import is_int, is_number, split_batch
from .structured_base import StructuredMethod, StructuredOptions, check_flops_target


@dataclass
class AutobotOptions(StructuredOptions):
    """Fields of ``PruneConfig(method="autobot", ...)``; defaults follow the authors' code."""

    # Fraction of dense FLOPs to keep, in (0, 1); or absolute MFLOPs (2 x MACs per image) when > 1.
    flops_target: float = 0.5
    # Weight of the FLOPs-target term and of the gate polarisation term.
    beta: float = 6.0
    gamma: float = 0.4
    # Adam learning rate of the gate logits, number of gate-training batches, and their batch size (for recipes;
    # not ``batch_size``, which recipes use for weight training).
    gate_lr: float = 0.6
    num_batches: int = 200
    gate_batch_size: int = 64
    # Initial gate value sigmoid(alpha), in (0, 1).
    gate_init: float = 0.9

    def __post_init__(self) -> None:
        super().__post_init__()
        check_flops_target(self.flops_target, optional=False)
        for name in ("beta", "gamma"):
            if not is_number(getattr(self, name)) or getattr(self, name) < 0:
                raise ValueError(f"PruneConfig.{name} must be a number >= 0; got {getattr(self, name)!r}")
        if not is_number(self.gate_lr) or self.gate_lr <= 0:
            raise ValueError(f"PruneConfig.gate_lr must be a number > 0; got {self.gate_lr!r}")
        for name in ("num_batches", "gate_batch_size"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                raise ValueError(f"PruneConfig.{name} must be an integer >= 1; got {value!r}")
        if not is_number(self.gate_init) or not 0 < self.gate_init < 1:
            raise ValueError(f"PruneConfig.gate_init must be in (0, 1); got {self.gate_init!r}")


def flops_loss(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """FLOPs-target term: 0 at the target, 1 at the dense model and at 0 FLOPs, linear in between.

    Normalised on each side as the authors' code does: ``(r - t) / (1 - t)`` above the target, ``1 - r / t``
    below (``r``, ``t``: FLOPs as fractions of the dense model's).
    """
    return torch.where(ratio > target, (ratio - target) / (1 - target), 1 - ratio / target)


@register_method("autobot")
class AutobotMethod(StructuredMethod):
    """AutoBot gates and selection (see the module docstring). Train the gates with ``pm.calibrate(batches)``."""

    options_cls = AutobotOptions
    # Removes channels to a FLOPs target: the filter share ``sparsity`` plays no part either.
    unused_fields = ("sparsity",) + StructuredMethod.unused_fields
    needs_calibration = True
    trial_removal = True

    def __init__(self, config: Any, model: nn.Module) -> None:
        super().__init__(config, model)
        # Gate logits; created once the dependency graph is known (first calibrate / prune).
        self.gate_logits: nn.Parameter | None = None
        self.history: dict[str, list[float]] = {}
        self._trained = False
        self._flat_gates: torch.Tensor | None = None  # what the gate hooks read while calibrating

    @property
    def calibration_batch_size(self) -> int:
        return self.config.gate_batch_size

    def ensure_graph(self, batch: torch.Tensor | None = None):
        state = super().ensure_graph(batch)
        if self.gate_logits is None or self.gate_logits.numel() != state.total:
            init = math.log(self.config.gate_init / (1 - self.config.gate_init))
            self.gate_logits = nn.Parameter(torch.full((state.total,), init, device=state.example.device))
        return state

    def gates(self) -> torch.Tensor:
        """Current gate values (detached), flat over all groups in ``self.groups`` order."""
        if self.gate_logits is None:
            raise RuntimeError("autobot: no gates yet; call pm.calibrate(batches) first")
        return torch.sigmoid(self.gate_logits.detach())

    # ------------------------------------------------------------------ gate training
    def calibrate(
        self,
        batches: Iterable[Any],
        num_batches: int | None = None,
        lr: float | None = None,
        log_every: int = 0,
    ) -> dict[str, list[float]]:
        """Train the gates on ``batches`` (see ``split_batch``) for ``num_batches`` steps (default: the config's).

        Weights stay frozen and the model stays in eval mode; returns (and keeps in ``self.history``) the
        per-step ``loss``, ``ce``, ``flops_ratio`` and ``mean_gate``.
        """
        num_batches = self.config.num_batches if num_batches is None else num_batches
        lr = self.config.gate_lr if lr is None else lr
        if num_batches < 1:
            raise ValueError(f"calibrate(num_batches=...) must be >= 1; got {num_batches}")
        model = self.model
        device = self.device()
        iterator = iter(batches)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError("autobot: calibrate(batches) yielded nothing") from None
        state = self.ensure_graph(split_batch(first)[0])
        counter = state.flops
        target = self.target_flops() / counter.dense
        if not 0 < target < 1:
            raise ValueError(
                f"autobot: flops_target {self.config.flops_target} is {target:.3f} x the dense FLOPs "
                f"({counter.dense / 1e6:.3f} MFLOPs); it must be below them"
            )
        # Per gate, 1 / (its group's size x number of groups): the polarisation term is a mean over groups of
        # each group's mean |g - round(g)|, so that wide layers do not outweigh narrow ones.
        weights = torch.cat(
            [torch.full((g.num_gates,), 1.0 / (g.num_gates * len(state.groups))) for g in state.groups]
        ).to(device)

        def polarisation(gates: torch.Tensor) -> torch.Tensor:
            return ((gates - gates.round()).abs() * weights).sum()

        frozen = [(p, p.requires_grad) for p in model.parameters()]
        was_training = model.training
        for p, _ in frozen:
            p.requires_grad_(False)
        model.eval()
        optimizer = torch.optim.Adam([self.gate_logits], lr=lr)
        history: dict[str, list[float]] = {"loss": [], "ce": [], "flops_ratio": [], "mean_gate": []}
        # (loss, gate logits) of every step: the best of the last 40% of the steps actually taken is kept
        # (an iterable may run out before num_batches). Gates are small: one copy per step is cheap.
        snapshots: list[tuple[float, torch.Tensor]] = []
        handles = attach_gates(state.modules, state.maps, lambda: self._flat_gates, device)
        try:
            step, batch = 0, first
            while True:
                x, y = split_batch(batch)
                x = x.to(device)
                if y is None:  # unlabeled: the dense model's predictions are the labels
                    with torch.no_grad():
                        self._flat_gates = None
                        y = model(x).argmax(-1)
                y = y.to(device)
                logits_now = self.gate_logits.detach().clone()
                gates = torch.sigmoid(self.gate_logits)
                self._flat_gates = with_constant(gates)
                ce = F.cross_entropy(model(x), y)
                ratio = (counter.count(gates) + counter.rest) / counter.dense
                loss = ce + self.config.beta * flops_loss(ratio, target) + self.config.gamma * polarisation(gates)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                for key, value in zip(history, (loss, ce, ratio, gates.mean()), strict=True):
                    history[key].append(float(value.detach()))
                snapshots.append((float(loss.detach()), logits_now))  # the gates this loss was computed with
                if log_every and step % log_every == 0:
                    print(f"autobot step {step}: loss {float(loss):.4f} ce {float(ce):.4f} flops {float(ratio):.3f}")
                step += 1
                if step >= num_batches:
                    break
                try:
                    batch = next(iterator)
                except StopIteration:
                    break
        finally:
            self._flat_gates = None
            for handle in handles:
                handle.remove()
            for p, flag in frozen:
                p.requires_grad_(flag)
            model.train(was_training)
        tail = snapshots[int(0.6 * len(snapshots)) :]
        best = min(tail, key=lambda item: item[0])[1]
        with torch.no_grad():
            self.gate_logits.copy_(best)
        self.history = history
        self._trained = True
        return history

    # ------------------------------------------------------------------ selection
    def plan(self) -> tuple[torch.Tensor, float]:
        """Keep-mask over all group channels meeting the FLOPs target, and the gate threshold used."""
        state = self.ensure_graph()
        counter = state.flops
        if not self._trained:
            # Untrained gates are all equal: the ranking would be the layer order, not a choice.
            raise RuntimeError("autobot: the gates are untrained; call pm.calibrate(batches) before prune()")
        logits = self.gate_logits.detach().cpu().double()
        protected = torch.zeros(state.total, dtype=torch.bool)
        for off, n in state.layout:
            protected[off + int(logits[off : off + n].argmax())] = True  # >= 1 channel per group
        order = [int(i) for i in torch.argsort(logits, stable=True) if not protected[i]]
        target = self.target_flops()

        def keep_for(k: int) -> torch.Tensor:  # prune the k lowest-ranked channels
            keep = torch.ones(state.total, dtype=torch.bool)
            keep[order[:k]] = False
            return keep

        if counter.keep_flops(keep_for(len(order))) > target:
            floor = counter.keep_flops(keep_for(len(order)))
            raise ValueError(
                f"autobot: flops_target {self.config.flops_target} ({target / 1e6:.3f} MFLOPs) is below what "
                f"one channel per group leaves ({floor / 1e6:.3f} MFLOPs); raise flops_target"
            )
        lo, hi = 0, len(order)  # FLOPs(keep_for(hi)) <= target; find the smallest such k (bisection)
        while lo < hi:
            mid = (lo + hi) // 2
            if counter.keep_flops(keep_for(mid)) <= target:
                hi = mid
            else:
                lo = mid + 1
        threshold = float(torch.sigmoid(logits[order[lo]])) if lo < len(order) else 1.0
        if lo == 0:
            threshold = float(torch.sigmoid(logits.min()))
        # Give back the highest-gated removed channels that still fit (one threshold moves in whole channels).
        keep = refill(keep_for(lo), reversed(order[:lo]), counter.keep_flops, target)
        return keep, threshold

    def plan_removal(self) -> tuple[torch.Tensor, dict[str, Any]]:
        keep, threshold = self.plan()
        return keep, {"threshold": threshold}

    def after_removal(self) -> None:
        # The gates describe the dense model; a second prune() needs new ones (calibrate again).
        self.gate_logits = None
        self._trained = False
