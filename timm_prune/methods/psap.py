"""PSAP: protective self-adaptive structured pruning (after arXiv 2303.11881, known to us by its abstract only).

Our formulation. A *filter* is one channel of a channel group: channels coupled by residual adds,
concatenations and depthwise / grouped convs are one filter (torch-pruning's dependency graph, as for AutoBot;
groups touching the stem, the classifier or attention q/k/v stay whole). Its weights are the output rows of
every targeted Conv2d / Linear that produces the channel.

- **Soft pruning.** A pruned filter's channel is multiplied by a gate ``m_f = 0`` at the input of every conv /
  linear that consumes it (forward pre-hooks), which is exactly what removing the channel does to those layers;
  the stored weights are untouched, so a restored filter comes back with its values. While pruned, neither its
  producing rows nor its consumers' input columns get a gradient (weight decay still shrinks them).
- **Gradient score (what the protective rule watches).** In training forwards during the ``score_steps``
  optimizer steps before each pruning step, the gates are a leaf tensor; after backward, ``G_f = dL/dm_f`` is
  the first-order change of the loss per unit of channel ``f`` (``sum over consumers and positions of
  dL/d(gated input) * input``, i.e. the consumer's effective-weight gradient contracted with its weights). It is
  read where nothing is masked: for a pruned filter (``m_f = 0``) it is the gain from restoring it, for a kept
  one (``m_f = 1``) the cost of removing it. ``score_f = mean over those steps of G_f ** 2`` (averaged over
  processes). Zeroing the stored weights instead, as soft filter pruning does, hides this gradient: behind
  BatchNorm + ReLU a zero filter's weight gradient is exactly 0 when the BatchNorm bias is <= 0 and about
  ``gamma / sqrt(eps)`` (~300x) too large otherwise.
- **Layer sparsity.** For each output layer ``L`` of group ``g``, a weight of a kept filter is *near zero* when
  ``|w| <= zero_threshold * rms_L``, ``rms_L`` the root mean square of the layer's kept filter weights. The
  group's sparsity ``s_g`` is the near-zero share of its kept filters' weights (pruned filters are not
  counted, so a group that has lost its small filters stops attracting the budget).
- **Adaptive ratios.** Each pruning step ``k = 1..K`` (``K = prune_steps``, one every ``prune_every``
  optimizer steps) has a global target: ``round(phi_k * sparsity * F)`` of the ``F`` prunable filters, or,
  with ``flops_target`` t, a FLOPs budget ``(1 - phi_k * (1 - t)) * dense`` (``phi_k`` cubic or linear in
  ``k / K``, 1 at ``k = K``). Group ``g`` (``n_g`` filters) prunes ``min(cap_g, lam * max(s_g, 1e-3) **
  adaptivity * n_g)`` filters, ``cap_g = min(floor(max_ratio * n_g), n_g - 1)``; ``lam`` is solved so the
  counts sum exactly to the target (largest-remainder rounding), or, for FLOPs, bisected so the FLOPs of the
  selection are the largest not above the budget, then the best removed filters are given back while they fit
  (within 0.5%).
- **Protective rule.** At each pruning step, filter ``f`` of group ``g`` is *protected* when ``score_f`` exceeds
  the ``protect`` quantile (default 0.9) of the scores of g's kept filters. Protected pruned filters are
  restored; protected kept filters are not pruned this step. Sparsity is measured after the restoration.
- **Selection.** In each group, the ``count`` unprotected filters of lowest magnitude are pruned; magnitude is
  ``sum over the group's layers of ||row||^2 / mean ||row||^2 of that layer`` (L2, scale-free across layers).
  If a group has fewer unprotected filters than its count, protected ones with the lowest score follow.
- **Hard pruning.** ``pm.prune()`` (running the remaining schedule in one step, with a warning, if training
  ended early) removes the pruned channels physically (torch-pruning), checks every layer against the plan, and
  reports params, FLOPs and CPU latency. For convs and linears that only feed convs and linears the soft-pruned
  model and the narrowed one compute the same outputs; a norm over channels (LayerNorm, GRN) sees the removed
  channels until ``prune()``.

Training loops call ``pm.on_step_end(total_steps=...)`` after each optimizer step (``recipes/train.py`` does);
``prune_every=None`` spreads the ``K`` steps over the first 75% of ``total_steps``. No penalty, no ``.grad``
writes: the gate gradients are read from per-forward leaf tensors that no optimizer sees.
"""

from __future__ import annotations

import math
import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..registry import register_method
from ..reports import StructuredReport
from ..structured.gates import attach_gates, with_constant
from ..structured.graph import ChannelGraph
from . import psap_select as sel
from .base import is_int, is_number
from .structured_base import StructuredMethod, StructuredOptions, check_flops_target

SCHEDULES = ("cubic", "linear")
# Share of total_steps the schedule spans when prune_every is None (the rest trains the final structure).
_AUTO_SPAN = 0.75


@dataclass
class PsapOptions(StructuredOptions):
    """Fields of ``PruneConfig(method="psap", ...)``; ``sparsity`` is the fraction of prunable filters removed."""

    # Fraction in (0, 1) of the dense FLOPs to keep, or absolute MFLOPs when > 1; None: use ``sparsity``.
    flops_target: float | None = None
    # Optimizer steps between pruning steps; None: spread prune_steps over 75% of on_step_end's total_steps.
    prune_every: int | None = None
    # Number of pruning steps K; the global target is met at the K-th.
    prune_steps: int = 10
    schedule: str = "cubic"
    # Near zero: |w| <= zero_threshold * rms of the layer's kept filter weights.
    zero_threshold: float = 0.1
    # Exponent on the group sparsity when sharing the budget (0: the same ratio everywhere).
    adaptivity: float = 1.0
    # No group loses more than this fraction of its filters (and never its last one).
    max_ratio: float = 0.9
    # Protective rule: protect filters whose gradient score exceeds this quantile of their group's kept filters'
    # scores; None (or False) turns the rule off.
    protect: float | None = 0.9
    # Optimizer steps before each pruning step whose gate gradients make the scores.
    score_steps: int = 50

    def __post_init__(self) -> None:
        super().__post_init__()
        check_flops_target(self.flops_target, optional=True)
        if self.prune_every is not None and (not is_int(self.prune_every) or self.prune_every < 1):
            raise ValueError(
                f"PruneConfig.prune_every must be None (auto) or an integer >= 1; got {self.prune_every!r}"
            )
        for name in ("prune_steps", "score_steps"):
            if not is_int(getattr(self, name)) or getattr(self, name) < 1:
                raise ValueError(f"PruneConfig.{name} must be an integer >= 1; got {getattr(self, name)!r}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"PruneConfig.schedule must be one of {list(SCHEDULES)}; got {self.schedule!r}")
        if not is_number(self.zero_threshold) or self.zero_threshold <= 0:
            raise ValueError(f"PruneConfig.zero_threshold must be a number > 0; got {self.zero_threshold!r}")
        if not is_number(self.adaptivity) or self.adaptivity < 0:
            raise ValueError(f"PruneConfig.adaptivity must be a number >= 0; got {self.adaptivity!r}")
        if not is_number(self.max_ratio) or not 0 < self.max_ratio < 1:
            raise ValueError(f"PruneConfig.max_ratio must be in (0, 1); got {self.max_ratio!r}")
        if self.protect is False:  # `--protect false` / `protect: false`: recipes cannot pass None for a field
            self.protect = None
        if self.protect is not None and (not is_number(self.protect) or not 0 <= self.protect < 1):
            raise ValueError(f"PruneConfig.protect must be None (off) or a quantile in [0, 1); got {self.protect!r}")


@dataclass
class PsapReport(StructuredReport):
    """A ``StructuredReport`` plus the filter counts (``threshold`` is unused: selection is per group)."""

    filters_before: int = 0
    filters_after: int = 0
    restored: int = 0  # filters the protective rule brought back over the whole schedule

    def __str__(self) -> str:
        lines = str(super().__str__()).splitlines()
        lines[4] = (
            f"  filters {self.filters_before} -> {self.filters_after} kept "
            f"({1 - self.filters_after / max(self.filters_before, 1):.1%} pruned; {self.restored} restored by the "
            f"protective rule); {len(self.groups)} channel groups:"
        )
        return "\n".join(lines)


@torch.no_grad()
def filter_stats(state: ChannelGraph, kept: torch.Tensor, zero_threshold: float) -> tuple[torch.Tensor, list[float]]:
    """Per filter magnitude and per group sparsity of the ``kept`` filters (bool over all filters).

    Magnitude: sum over the layers producing the filter of ``||row||^2 / mean ||row||^2`` of that layer (L2,
    comparable across layers of different scale). Sparsity of a group: the share of its kept filters' weights with
    ``|w| <= zero_threshold * rms``, ``rms`` over the kept filter weights of the same layer.
    """
    total = state.total
    mag, near, numel = (torch.zeros(total + 1, dtype=torch.float64) for _ in range(3))
    live_flat = torch.cat([kept.cpu(), torch.zeros(1, dtype=torch.bool)])  # ungrouped rows are not counted
    for name, index in state.out_maps.items():
        w = state.modules[name].weight.detach().float().flatten(1).cpu()
        sq = w.square().sum(1).double()
        mag.index_add_(0, index, sq / sq[index < total].mean().clamp_min(1e-30))
        live = live_flat[index]
        if bool(live.any()):
            rms = math.sqrt(float(sq[live].sum()) / (int(live.sum()) * w.shape[1]))
            near.index_add_(0, index, ((w.abs() <= zero_threshold * rms).sum(1) * live).double())
            numel.index_add_(0, index, live.double() * w.shape[1])
    sparsity = []
    for off, n in state.layout:
        denominator = float(numel[off : off + n].sum())
        sparsity.append(float(near[off : off + n].sum()) / denominator if denominator > 0 else 0.0)
    return mag[:total], sparsity


@register_method("psap")
class PsapMethod(StructuredMethod):
    """PSAP (see the module docstring). Call ``pm.on_step_end(total_steps=...)`` after each optimizer step."""

    options_cls = PsapOptions
    report_cls = PsapReport

    def __init__(self, config: Any, model: nn.Module) -> None:
        super().__init__(config, model)
        if config.flops_target is None and config.sparsity > config.max_ratio:
            raise ValueError(
                f"PruneConfig.sparsity {config.sparsity} is above PruneConfig.max_ratio {config.max_ratio}: no group "
                "may lose more than max_ratio of its filters"
            )
        # Sized when the graph is built (first forward); checkpoints carry them (see _load_from_state_dict).
        self.register_buffer("pruned", torch.zeros(0, dtype=torch.bool))
        self.register_buffer("score_sum", torch.zeros(0))
        self.register_buffer("score_count", torch.zeros((), dtype=torch.long))
        self.register_buffer("step", torch.zeros((), dtype=torch.long))
        self.register_buffer("prune_step", torch.zeros((), dtype=torch.long))
        self.register_buffer("restored_total", torch.zeros((), dtype=torch.long))
        self._flat: torch.Tensor | None = None  # what the gate hooks read: keep flags and a constant 1
        self._leaves: list[torch.Tensor] = []  # this step's gate leaves (their .grad is dL/dm)
        self._building = False  # tracing runs the model: our own forward hook must stand aside
        self._any_pruned: bool | None = False  # None: recompute from `pruned` (after a state-dict load)
        self._every: int | None = config.prune_every
        self._counters: tuple[int, int] | None = None  # host copies of (step, prune_step)
        self._gate_handles: list[Any] = []
        self._root_handle: Any = None
        self.last_logs: dict[str, float] = {}
        self.last_plan: dict[str, Any] = {}

    def attach(self, layers: dict[str, nn.Module]) -> None:
        super().attach(layers)
        self._register_root_hook()

    def _register_root_hook(self) -> None:
        # A closure, not a bound method: deep copies of the model share it instead of copying the method.
        self._root_handle = self.model.register_forward_pre_hook(lambda m, args: self._on_forward(m, args))

    # ------------------------------------------------------------------ graph and gates
    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        if self._building or self._structure is not None or not args:
            return None
        if self._graph is None:
            self.trace(args[0])
        if self._any_pruned is None:  # after a state-dict load
            self._any_pruned = bool(self.pruned.any())
        keep = (~self.pruned).float()
        if module.training and torch.is_grad_enabled() and self._recording():
            keep.requires_grad_(True)  # a fresh leaf per forward: its .grad is dL/dm (read in on_step_end)
            self._leaves.append(keep)
            del self._leaves[:-256]  # a loop that never calls on_step_end must not grow this without bound
        elif not self._any_pruned:
            self._flat = None
            return None
        self._flat = with_constant(keep)
        return None

    def _recording(self) -> bool:
        if self._counters is None:  # host copies of the step buffers: no device sync on every forward
            self._counters = (int(self.step), int(self.prune_step))
        step, prune_step = self._counters
        if self.config.protect is None or prune_step >= self.config.prune_steps:
            return False
        every = self._every
        if every is None:
            return True
        # The forward belongs to optimizer step `step + 1`; pruning steps end at multiples of `every`.
        return step % every >= every - self.config.score_steps

    def trace(self, batch: torch.Tensor | None = None) -> ChannelGraph:
        self._building = True
        try:
            state = super().trace(batch)
        finally:
            self._building = False
        if self.config.flops_target is not None:  # fail at the first forward, not at the last pruning step
            caps = sel.group_caps([n for _, n in state.layout], self.config.max_ratio)
            floor = torch.zeros(state.total, dtype=torch.bool)
            for (off, _), cap in zip(state.layout, caps, strict=True):
                floor[off : off + cap] = True
            least, budget = state.flops.keep_flops(~floor), self.target_flops(state.flops.dense)
            if least > budget:
                raise ValueError(
                    f"psap: PruneConfig.flops_target {self.config.flops_target} ({budget / 1e6:.3f} "
                    f"MFLOPs) is below what max_ratio {self.config.max_ratio} allows in {type(self.model).__name__} "
                    f"({least / 1e6:.3f} MFLOPs): raise flops_target or max_ratio"
                )
        self._gate_handles = attach_gates(state.modules, state.maps, lambda: self._flat, state.example.device)
        total = state.total
        if self.pruned.numel() == 0:
            self.pruned = torch.zeros(total, dtype=torch.bool, device=state.example.device)
            self.score_sum = torch.zeros(total, device=state.example.device)
        elif self.pruned.numel() != total:
            raise RuntimeError(f"psap: the saved state has {self.pruned.numel()} filters where this model has {total}")
        self._any_pruned = None
        return state

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        # Buffers are sized by the graph; a checkpoint may arrive before the first forward builds it.
        for name in ("pruned", "score_sum"):
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape and self._graph is None:
                setattr(self, name, torch.empty_like(value, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self._any_pruned = None
        self._counters = None

    # ------------------------------------------------------------------ schedule
    def on_step_end(self, total_steps: int | None = None, **logs: Any) -> dict[str, float]:
        """After each optimizer step: accumulate the gate-gradient scores; prune at the scheduled steps."""
        if self._structure is not None:
            return {}
        self.step += 1
        leaves, self._leaves = self._leaves, []
        grads = [leaf.grad for leaf in leaves if leaf.grad is not None]
        if grads and self.score_sum.numel() == grads[0].numel():
            g = torch.stack(grads).sum(0).float()
            if bool(torch.isfinite(g).all()):  # fp16 overflow steps are skipped, as GradScaler skips them
                self.score_sum += g.square()
                self.score_count += 1
        every = self.config.prune_every
        if every is None:
            if total_steps is None:
                raise ValueError(
                    "psap: PruneConfig.prune_every is None (auto), so on_step_end(total_steps=...) must give the "
                    "number of optimizer steps; or set prune_every"
                )
            every = max(1, int(_AUTO_SPAN * total_steps) // self.config.prune_steps)
        self._every = every
        self._counters = None
        if int(self.prune_step) < self.config.prune_steps and int(self.step) % every == 0:
            return self.run_pruning_step()
        return {}

    def on_epoch_end(self, **logs: Any) -> dict[str, float]:
        return dict(self.last_logs)

    def _scores(self) -> torch.Tensor:
        total = self.score_sum.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            world = torch.distributed.get_world_size()
            if world > 1:  # every rank reaches each pruning step at the same optimizer step
                torch.distributed.all_reduce(total)
                total /= world
        return (total / self.score_count.clamp_min(1)).double().cpu()

    def filter_stats(self, kept: torch.Tensor) -> tuple[torch.Tensor, list[float]]:
        """Per filter magnitude and per group sparsity of the ``kept`` filters (see ``filter_stats``)."""
        return filter_stats(self.ensure_graph(), kept, self.config.zero_threshold)

    @torch.no_grad()
    def run_pruning_step(self, k: int | None = None) -> dict[str, float]:
        """Run pruning step ``k`` (default: the next one) of the schedule; returns its logs."""
        state = self.ensure_graph()
        steps = self.config.prune_steps
        k = int(self.prune_step) + 1 if k is None else k
        phi = sel.schedule_fraction(k, steps, self.config.schedule)
        pruned = self.pruned.cpu()
        scores = self._scores()
        if self.config.protect is not None and int(self.score_count) > 0:
            protected = sel.protected_filters(scores, ~pruned, state.layout, self.config.protect)
        else:
            protected = torch.zeros_like(pruned)
        magnitude, sparsity = self.filter_stats(~pruned | protected)
        sizes = [n for _, n in state.layout]
        caps = sel.group_caps(sizes, self.config.max_ratio)
        weights = sel.adaptive_weights(sparsity, self.config.adaptivity)
        if self.config.flops_target is None:
            counts = sel.allocate_counts(sizes, caps, weights, round(phi * self.config.sparsity * state.total))
            new = sel.select(counts, state.layout, magnitude, scores, protected)
            budget = None
        else:
            dense = state.flops.dense
            budget = dense - phi * (dense - self.target_flops())
            new = self._plan_flops(budget, sizes, caps, weights, magnitude, scores, protected)
        restored = int((pruned & ~new & protected).sum())
        self.pruned = new.to(self.pruned.device)
        self._any_pruned = bool(new.any())
        self.score_sum.zero_()
        self.score_count.zero_()
        self.prune_step.fill_(k)
        self._counters = None
        self.restored_total += restored
        flops = state.flops.keep_flops(~new)
        self.last_logs = {
            "psap/prune_step": float(k),
            "psap/target_fraction": phi,
            "psap/pruned_fraction": float(new.float().mean()),
            "psap/flops_ratio": flops / state.flops.dense,
            "psap/restored": float(restored),
            "psap/protected": float(protected.sum()),
            "psap/mean_group_sparsity": sum(sparsity) / len(sparsity),
        }
        # For inspection and tests: what this step decided, per group.
        self.last_plan = {
            "counts": [int(new[o : o + n].sum()) for o, n in state.layout],
            "sizes": sizes,
            "sparsity": sparsity,
            "protected": protected,
            "flops_budget": budget,
        }
        return dict(self.last_logs)

    def _plan_flops(self, budget, sizes, caps, weights, magnitude, scores, protected) -> torch.Tensor:
        state = self.ensure_graph()
        try:
            return sel.plan_flops(
                budget, sizes, caps, weights, state.layout, magnitude, scores, protected, state.flops.keep_flops
            )
        except ValueError as e:
            raise ValueError(
                f"psap: flops_target {self.config.flops_target}: {e} (max_ratio {self.config.max_ratio}, one filter "
                "per group); raise flops_target or max_ratio"
            ) from None

    # ------------------------------------------------------------------ hard pruning
    def plan_removal(self) -> tuple[torch.Tensor, dict[str, Any]]:
        if self._structure is not None:
            raise RuntimeError("psap: this model is already pruned (its channels are gone)")
        state = self.ensure_graph()
        if int(self.prune_step) < self.config.prune_steps:
            warnings.warn(
                f"psap: prune() after {int(self.prune_step)} of {self.config.prune_steps} pruning steps; the rest of "
                "the schedule runs now in one step (train longer, or lower prune_every, to let it unfold)",
                stacklevel=4,
            )
            self.run_pruning_step(self.config.prune_steps)
        keep = ~self.pruned.cpu()
        extra = {
            "threshold": 0.0,
            "filters_before": state.total,
            "filters_after": int(keep.sum()),
            "restored": int(self.restored_total),
        }
        return keep, extra

    def detach_for_removal(self) -> None:
        for handle in self._gate_handles:  # channel indices change below: the gates must go first
            handle.remove()
        self._gate_handles = []
        self._root_handle.remove()
        self._flat = None

    def reattach_after_rollback(self) -> None:
        # A rolled-back model stays soft-pruned and trainable through its gates.
        state = self._graph
        self._gate_handles = attach_gates(state.modules, state.maps, lambda: self._flat, state.example.device)
        self._register_root_hook()
