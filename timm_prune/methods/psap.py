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

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .. import _psap_select as sel
from .._psap_graph import ChannelGraph, build_channel_graph, filter_stats, remove_channels
from ..structured import StructuredReport, count_params, measure_flops, measure_latency, snapshot, structure_diff
from ..structured_guard import remove_or_roll_back, warn_if_off_plan
from .base import PruneMethod, is_int, is_number
from .registry import register_method

SCHEDULES = ("cubic", "linear")
# Share of total_steps the schedule spans when prune_every is None (the rest trains the final structure).
_AUTO_SPAN = 0.75


@dataclass
class PsapOptions:
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
    # (C, H, W) to trace the model and count FLOPs; None: the first forward's input size, else pretrained_cfg.
    input_size: list[int] | None = None
    # Timed batch-1 CPU forwards for the report's latency figures; 0 skips them.
    latency_runs: int = 10

    def __post_init__(self) -> None:
        t = self.flops_target
        if t is not None and (not is_number(t) or t <= 0 or t == 1):
            raise ValueError(
                f"PruneConfig.flops_target must be None, a fraction in (0, 1) of the dense FLOPs, or MFLOPs > 1; "
                f"got {t!r}"
            )
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
        if self.input_size is not None:
            size = list(self.input_size)
            if len(size) != 3 or not all(is_int(v) and v > 0 for v in size):
                raise ValueError(f"PruneConfig.input_size must be None or [C, H, W] positive ints; got {size!r}")
            self.input_size = size
        if not is_int(self.latency_runs) or self.latency_runs < 0:
            raise ValueError(f"PruneConfig.latency_runs must be an integer >= 0; got {self.latency_runs!r}")


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


@register_method("psap")
class PsapMethod(PruneMethod):
    """PSAP (see the module docstring). Call ``pm.on_step_end(total_steps=...)`` after each optimizer step."""

    options_cls = PsapOptions
    structured = True

    def __init__(self, config) -> None:
        super().__init__(config)
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
        for key, value in (("_graph", None), ("_flat", None), ("_leaves", []), ("_building", False)):
            self.__dict__[key] = value
        self.__dict__["_any_pruned"] = False
        self.__dict__["_every"] = config.prune_every
        self.last_logs: dict[str, float] = {}
        self.last_plan: dict[str, Any] = {}

    @property
    def root(self) -> nn.Module:
        return self.__dict__["root"]

    @property
    def groups(self) -> list:
        graph = self.__dict__["_graph"]
        return [] if graph is None else graph.groups

    def attach(self, layers: dict[str, nn.Module]) -> None:
        super().attach(layers)
        # A closure, not a bound method: deep copies of the model share it instead of copying the method.
        self.__dict__["_root_handle"] = self.root.register_forward_pre_hook(lambda m, args: self._on_forward(m, args))

    def penalty(self) -> torch.Tensor:
        return torch.zeros((), device=next(self.root.parameters()).device)

    def candidate_energy(self) -> dict[str, float]:
        return {}  # filters are chosen at the pruning steps; there is no weight-level candidate set

    # ------------------------------------------------------------------ graph and gates
    def _on_forward(self, module: nn.Module, args: tuple) -> None:
        if self.__dict__["_building"] or self.__dict__.get("_structure") is not None or not args:
            return None
        if self.__dict__["_graph"] is None:
            self._build(args[0])
        if self.__dict__["_any_pruned"] is None:  # after a state-dict load
            self.__dict__["_any_pruned"] = bool(self.pruned.any())
        keep = (~self.pruned).float()
        if module.training and torch.is_grad_enabled() and self._recording():
            keep.requires_grad_(True)  # a fresh leaf per forward: its .grad is dL/dm (read in on_step_end)
            leaves = self.__dict__["_leaves"]
            leaves.append(keep)
            del leaves[:-256]  # a loop that never calls on_step_end must not grow this without bound
        elif not self.__dict__["_any_pruned"]:
            self.__dict__["_flat"] = None
            return None
        self.__dict__["_flat"] = torch.cat([keep, keep.new_ones(1)])
        return None

    def _recording(self) -> bool:
        counters = self.__dict__.get("_counters")
        if counters is None:  # host copies of the step buffers: no device sync on every forward
            counters = self.__dict__["_counters"] = (int(self.step), int(self.prune_step))
        step, prune_step = counters
        if self.config.protect is None or prune_step >= self.config.prune_steps:
            return False
        every = self.__dict__["_every"]
        if every is None:
            return True
        # The forward belongs to optimizer step `step + 1`; pruning steps end at multiples of `every`.
        return step % every >= every - self.config.score_steps

    def _example(self, batch: torch.Tensor | None) -> torch.Tensor:
        device = next(self.root.parameters()).device
        if batch is not None and self.config.input_size is None:
            dtype = next(self.root.parameters()).dtype
            with torch.inference_mode(False):  # no RNG draw: training stays reproducible
                return batch[:1].detach().clone().to(device=device, dtype=dtype)
        size = self.config.input_size
        if size is None:
            cfg = getattr(self.root, "pretrained_cfg", None) or {}
            size = list(cfg.get("input_size", (3, 224, 224)))
        return torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(device)

    def _build(self, batch: torch.Tensor | None) -> ChannelGraph:
        example = self._example(batch)
        self.__dict__["_building"] = True  # tracing runs the model: our own forward hook must stand aside
        try:
            state = build_channel_graph(self.root, example, self.layers)
        finally:
            self.__dict__["_building"] = False
        if self.config.flops_target is not None:  # fail at the first forward, not at the last pruning step
            caps = sel.group_caps([n for _, n in state.layout], self.config.max_ratio)
            floor = torch.zeros(state.total, dtype=torch.bool)
            for (off, _), cap in zip(state.layout, caps, strict=True):
                floor[off : off + cap] = True
            least, budget = state.counter.keep_flops(~floor), self.target_flops(state.counter.dense)
            if least > budget:
                raise ValueError(
                    f"psap: PruneConfig.flops_target {self.config.flops_target} ({budget / 1e6:.3f} "
                    f"MFLOPs) is below what max_ratio {self.config.max_ratio} allows in {type(self.root).__name__} "
                    f"({least / 1e6:.3f} MFLOPs): raise flops_target or max_ratio"
                )
        self._register_gates(state, example.device)
        total = state.total
        if self.pruned.numel() == 0:
            self.pruned = torch.zeros(total, dtype=torch.bool, device=example.device)
            self.score_sum = torch.zeros(total, device=example.device)
        elif self.pruned.numel() != total:
            raise RuntimeError(f"psap: the saved state has {self.pruned.numel()} filters where this model has {total}")
        self.__dict__["_graph"] = state
        self.__dict__["_any_pruned"] = None
        return state

    def _register_gates(self, state: ChannelGraph, device: torch.device) -> None:
        for name, index in state.in_maps.items():
            hook = self._gate_hook(index.to(device))
            state.handles.append(state.modules[name].register_forward_pre_hook(hook))

    def _gate_hook(self, index: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            flat = self.__dict__["_flat"]
            if flat is None or not args:
                return None
            x = args[0]
            scale = flat[index if index.device == flat.device else index.to(flat.device)].to(x.dtype)
            if isinstance(module, nn.Conv2d):
                scale = scale.view(1, -1, 1, 1)
            return (x * scale,) + tuple(args[1:])

        return hook

    def _ensure_graph(self) -> ChannelGraph:
        graph = self.__dict__["_graph"]
        return graph if graph is not None else self._build(None)

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing, unexpected, errors) -> None:
        # Buffers are sized by the graph; a checkpoint may arrive before the first forward builds it.
        for name in ("pruned", "score_sum"):
            value = state_dict.get(prefix + name)
            if value is not None and value.shape != getattr(self, name).shape and self.__dict__["_graph"] is None:
                setattr(self, name, torch.empty_like(value, device=getattr(self, name).device))
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing, unexpected, errors)
        self.__dict__["_any_pruned"] = None
        self.__dict__["_counters"] = None

    # ------------------------------------------------------------------ schedule
    def on_step_end(self, total_steps: int | None = None, **logs: Any) -> dict[str, float]:
        """After each optimizer step: accumulate the gate-gradient scores; prune at the scheduled steps."""
        if self.__dict__.get("_structure") is not None:
            return {}
        self.step += 1
        leaves, self.__dict__["_leaves"] = self.__dict__["_leaves"], []
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
        self.__dict__["_every"] = every
        self.__dict__["_counters"] = None
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
        """Per filter magnitude and per group sparsity of the ``kept`` filters (see ``_psap_graph.filter_stats``)."""
        return filter_stats(self._ensure_graph(), kept, self.config.zero_threshold)

    def target_flops(self, dense: float | None = None) -> float:
        """The FLOPs budget of ``flops_target`` (2 x MACs per image at the traced input size)."""
        t = self.config.flops_target
        dense = self._ensure_graph().counter.dense if dense is None else dense
        return t * dense if t < 1 else t * 1e6

    @torch.no_grad()
    def run_pruning_step(self, k: int | None = None) -> dict[str, float]:
        """Run pruning step ``k`` (default: the next one) of the schedule; returns its logs."""
        state = self._ensure_graph()
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
            dense = state.counter.dense
            budget = dense - phi * (dense - self.target_flops())
            new = self._plan_flops(budget, sizes, caps, weights, magnitude, scores, protected)
        restored = int((pruned & ~new & protected).sum())
        self.pruned = new.to(self.pruned.device)
        self.__dict__["_any_pruned"] = bool(new.any())
        self.score_sum.zero_()
        self.score_count.zero_()
        self.prune_step.fill_(k)
        self.__dict__["_counters"] = None
        self.restored_total += restored
        flops = state.counter.keep_flops(~new)
        self.last_logs = {
            "psap/prune_step": float(k),
            "psap/target_fraction": phi,
            "psap/pruned_fraction": float(new.float().mean()),
            "psap/flops_ratio": flops / state.counter.dense,
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
        state = self._ensure_graph()
        try:
            return sel.plan_flops(
                budget, sizes, caps, weights, state.layout, magnitude, scores, protected, state.counter.keep_flops
            )
        except ValueError as e:
            raise ValueError(
                f"psap: flops_target {self.config.flops_target}: {e} (max_ratio {self.config.max_ratio}, one filter "
                "per group); raise flops_target or max_ratio"
            ) from None

    # ------------------------------------------------------------------ hard pruning
    @torch.no_grad()
    def prune_structured(self) -> PsapReport:
        if self.__dict__.get("_structure") is not None:
            raise RuntimeError("psap: this model is already pruned (its channels are gone)")
        state = self._ensure_graph()
        if int(self.prune_step) < self.config.prune_steps:
            warnings.warn(
                f"psap: prune() after {int(self.prune_step)} of {self.config.prune_steps} pruning steps; the rest of "
                "the schedule runs now in one step (train longer, or lower prune_every, to let it unfold)",
                stacklevel=3,
            )
            self.run_pruning_step(self.config.prune_steps)
        model, example, runs = self.root, state.example, self.config.latency_runs
        keep = ~self.pruned.cpu()
        was_training = model.training
        model.eval()
        for handle in state.handles:  # channel indices change below: the gates must go first
            handle.remove()
        state.handles.clear()
        self.__dict__["_root_handle"].remove()
        self.__dict__["_flat"] = None
        params_before, flops_before = count_params(model), state.counter.dense
        latency_before = measure_latency(model, example, runs) if runs else None
        before = snapshot(model)

        def remove() -> tuple[list[dict[str, Any]], float]:
            rows = remove_channels(state, keep)
            return rows, measure_flops(model, example)

        def reattach() -> None:  # a rolled-back model stays soft-pruned and trainable through its gates
            self._register_gates(state, example.device)
            self.__dict__["_root_handle"] = model.register_forward_pre_hook(lambda m, args: self._on_forward(m, args))
            model.train(was_training)

        # Transactional, as AutoBot's: any failure rolls the model back, gate hooks included, then raises.
        rows, flops_after = remove_or_roll_back("psap", model, state.graph, remove, on_rollback=reattach)
        planned = state.counter.keep_flops(keep)
        warn_if_off_plan("psap", model, flops_after, planned)
        latency_after = measure_latency(model, example, runs) if runs else None
        model.train(was_training)
        self.__dict__["_structure"] = structure_diff(before, model)
        self.__dict__["_graph"] = None  # it describes the dense model
        return PsapReport(
            method=self.name,
            flops_target=self.config.flops_target,
            target_flops=flops_after if self.config.flops_target is None else self.target_flops(flops_before),
            input_size=list(example.shape[1:]),
            params_before=params_before,
            params_after=count_params(model),
            flops_before=flops_before,
            flops_after=flops_after,
            latency_ms_before=latency_before,
            latency_ms_after=latency_after,
            threshold=0.0,
            groups=rows,
            planned_flops=planned,
            filters_before=state.total,
            filters_after=int(keep.sum()),
            restored=int(self.restored_total),
        )

    def structure(self) -> dict[str, Any] | None:
        """The rebuild record of ``prune()`` (see ``timm_prune.structured.structure_diff``)."""
        return self.__dict__.get("_structure")
