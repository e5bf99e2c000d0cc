"""AutoBot: trainable bottleneck gates to a FLOPs target, then structured channel removal (arXiv 2111.09635).

Our formulation (after the authors' public code, written anew):

- Channel groups come from torch-pruning's dependency graph: channels coupled by residual adds, concatenations,
  depthwise / grouped convs and the residual stream of ViTs share one gate. Groups are rooted at the targeted
  Conv2d/Linear layers (``target_modules``); a group any of whose output-side layers is not targeted (the stem,
  the classifier) stays whole, and so do the q/k/v outputs of attention modules (head counts never change).
  Each group is tried once on the model (one gate's channels removed, then restored): a group that torch-pruning
  does not remove consistently (Swin-V2-CR's window attention, GhostNet's cheap operations) stays whole, with a
  warning. Patch merging (Swin) has its own rule (``timm_prune.structured_rules``).
- Each group channel ``c`` has a gate ``g_c = sigmoid(alpha_c)``, ``alpha`` initialised so that ``g = gate_init``.
  The gate multiplies channel ``c`` at the input of every conv / linear that consumes it (which is exactly what
  removing it does to those layers).
- ``train_gates(batches)``: weights frozen, model in eval mode, only ``alpha`` trains with Adam (``gate_lr``) on
  ``loss = CE + beta * L_flops + gamma * L_bool`` where ``L_flops`` is ``(r - t) / (1 - t)`` above the target
  ratio ``t`` and ``1 - r / t`` below it, ``r = F(g) / F_dense``, ``F(g)`` the FLOPs count
  with every channel weighted by its gate (differentiable; exact for 0/1 gates), and ``L_bool`` the mean over
  groups of each group's mean ``|g - round(g)|``. Labels come from the batches,
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
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..structured import (
    GatedCounter,
    StructuredReport,
    build_groups,
    count_params,
    drop_unremovable_groups,
    measure_flops,
    measure_latency,
    snapshot,
    structure_diff,
)
from ..structured_guard import (
    StructuredPruneError,
    clear_attention_caches,
    failing_module,
    follow_parameter_shapes,
    parameter_shapes,
    remove_or_roll_back,
    warn_if_off_plan,
)
from .base import PruneMethod, is_int, is_number
from .registry import register_method

# Selection gives back removed channels (highest gate first) until the FLOPs are within this fraction of the
# target, trying at most this many channels.
_REFILL_TOLERANCE = 0.005
_MAX_REFILL = 512


@dataclass
class AutobotOptions:
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
    # (C, H, W) used to trace the model and count FLOPs; None: the training batches' size, else pretrained_cfg.
    input_size: list[int] | None = None
    # Timed forward passes (batch 1, CPU) for the latency figures of the report; 0 skips the measurement.
    latency_runs: int = 10

    def __post_init__(self) -> None:
        t = self.flops_target
        if not is_number(t) or t <= 0 or t == 1:
            raise ValueError(
                f"PruneConfig.flops_target must be a fraction in (0, 1) of the dense FLOPs or MFLOPs > 1; got {t!r}"
            )
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
        if self.input_size is not None:
            size = list(self.input_size)
            if len(size) != 3 or not all(is_int(v) and v > 0 for v in size):
                raise ValueError(f"PruneConfig.input_size must be None or [C, H, W] positive ints; got {size!r}")
            self.input_size = size
        if not is_int(self.latency_runs) or self.latency_runs < 0:
            raise ValueError(f"PruneConfig.latency_runs must be an integer >= 0; got {self.latency_runs!r}")


def flops_loss(ratio: torch.Tensor, target: float) -> torch.Tensor:
    """FLOPs-target term: 0 at the target, 1 at the dense model and at 0 FLOPs, linear in between.

    Normalised on each side as the authors' code does: ``(r - t) / (1 - t)`` above the target, ``1 - r / t``
    below (``r``, ``t``: FLOPs as fractions of the dense model's).
    """
    return torch.where(ratio > target, (ratio - target) / (1 - target), 1 - ratio / target)


def _split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        x = next((batch[k] for k in ("pixel_values", "image", "images", "x") if k in batch), None)
        if x is None:
            raise ValueError(f"batch dict has no input key (pixel_values/image/images/x); keys: {sorted(batch)}")
        y = next((batch[k] for k in ("labels", "label", "targets", "y") if k in batch), None)
        return x, y
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ValueError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


@register_method("autobot")
class AutobotMethod(PruneMethod):
    """AutoBot gates and selection (see the module docstring). Train with ``pm.pruner.train_gates(batches)``."""

    options_cls = AutobotOptions
    structured = True

    def __init__(self, config) -> None:
        super().__init__(config)
        # Gate logits; created once the dependency graph is known (first train_gates / prune).
        self.gate_logits: nn.Parameter | None = None
        self.__dict__["_counter"] = None
        self.__dict__["_graph"] = None
        self.history: dict[str, list[float]] = {}

    @property
    def root(self) -> nn.Module:
        return self.__dict__["root"]

    # ------------------------------------------------------------------ set-up
    def _example(self, batch: torch.Tensor | None) -> torch.Tensor:
        device = next(self.root.parameters()).device
        size = self.config.input_size
        if size is None and batch is not None:
            return batch[:1].detach().to(device)
        if size is None:
            cfg = getattr(self.root, "pretrained_cfg", None) or {}
            size = list(cfg.get("input_size", (3, 224, 224)))
        return torch.randn(1, *size, device=device)

    def _ensure_graph(self, batch: torch.Tensor | None) -> GatedCounter:
        counter = self.__dict__["_counter"]
        if counter is not None:
            return counter
        example = self._example(batch)
        was_training = self.root.training
        self.root.eval()
        try:
            with torch.enable_grad():  # torch-pruning traces through autograd (prune() runs under no_grad)
                graph, groups, handlers = build_groups(self.root, example, self.layers)
                groups, handlers, dropped = drop_unremovable_groups(self.root, graph, groups, handlers, example)
            if dropped:
                warnings.warn(
                    f"autobot: {len(dropped)} channel group(s) of {type(self.root).__name__} stay whole: torch-pruning "
                    f"does not remove them consistently (rooted at {', '.join(dropped[:4])}"
                    f"{', ...' if len(dropped) > 4 else ''})",
                    stacklevel=3,
                )
            if not groups:
                raise ValueError(
                    f"autobot: no prunable channel group in {type(self.root).__name__} with these target_modules "
                    "(every group touches a non-targeted layer such as the stem or the classifier, or has channel "
                    "indices torch-pruning cannot map, such as GLU halves)"
                )
            counter = GatedCounter(self.root, groups, example)
        finally:
            self.root.train(was_training)
        self.__dict__["_graph"] = (graph, handlers)
        self.__dict__["_counter"] = counter
        self.__dict__["_example_input"] = example
        if self.gate_logits is None or self.gate_logits.numel() != counter.total:
            init = math.log(self.config.gate_init / (1 - self.config.gate_init))
            device = example.device
            self.gate_logits = nn.Parameter(torch.full((counter.total,), init, device=device))
        return counter

    def target_flops(self, counter: GatedCounter) -> float:
        t = self.config.flops_target
        return t * counter.dense if t < 1 else t * 1e6

    def gates(self) -> torch.Tensor:
        """Current gate values (detached), flat over all groups in ``self.groups`` order."""
        if self.gate_logits is None:
            raise RuntimeError("autobot: no gates yet; call train_gates(batches) first")
        return torch.sigmoid(self.gate_logits.detach())

    @property
    def groups(self) -> list:
        counter = self.__dict__["_counter"]
        return [] if counter is None else counter.groups

    def penalty(self) -> torch.Tensor:
        # AutoBot trains gates, not weights: nothing to add to a weight-training loss.
        return torch.zeros((), device=next(self.root.parameters()).device)

    def candidate_energy(self) -> dict[str, float]:
        # Channels are chosen by the gates after weight training: there is no candidate set to report before.
        return {}

    # ------------------------------------------------------------------ gate training
    def train_gates(
        self,
        batches: Iterable[Any],
        num_batches: int | None = None,
        lr: float | None = None,
        log_every: int = 0,
    ) -> dict[str, list[float]]:
        """Train the gates on ``batches`` (tensors, ``(inputs, labels)`` or dicts) for ``num_batches`` steps.

        Weights stay frozen and the model stays in eval mode; returns (and keeps in ``self.history``) the
        per-step ``loss``, ``ce``, ``flops_ratio`` and ``mean_gate``.
        """
        num_batches = self.config.num_batches if num_batches is None else num_batches
        lr = self.config.gate_lr if lr is None else lr
        if num_batches < 1:
            raise ValueError(f"train_gates(num_batches=...) must be >= 1; got {num_batches}")
        model = self.root
        device = next(model.parameters()).device
        iterator = iter(batches)
        try:
            first = next(iterator)
        except StopIteration:
            raise ValueError("train_gates: `batches` yielded nothing") from None
        counter = self._ensure_graph(_split_batch(first)[0])
        target = self.target_flops(counter) / counter.dense
        if not 0 < target < 1:
            raise ValueError(
                f"autobot: flops_target {self.config.flops_target} is {target:.3f} x the dense FLOPs "
                f"({counter.dense / 1e6:.3f} MFLOPs); it must be below them"
            )
        # Per gate, 1 / (its group's size x number of groups): the polarisation term is a mean over groups of
        # each group's mean |g - round(g)|, so that wide layers do not outweigh narrow ones.
        weights = torch.cat(
            [torch.full((g.num_gates,), 1.0 / (g.num_gates * len(counter.groups))) for g in counter.groups]
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
        counter.attach()
        try:
            step, batch = 0, first
            while True:
                x, y = _split_batch(batch)
                x = x.to(device)
                if y is None:  # unlabeled: the dense model's predictions are the labels
                    with torch.no_grad():
                        counter.gates = None
                        y = model(x).argmax(-1)
                y = y.to(device)
                logits_now = self.gate_logits.detach().clone()
                gates = torch.sigmoid(self.gate_logits)
                counter.gates = gates
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
            counter.gates = None
            counter.detach()
            for p, flag in frozen:
                p.requires_grad_(flag)
            model.train(was_training)
        tail = snapshots[int(0.6 * len(snapshots)) :]
        best = min(tail, key=lambda item: item[0])[1]
        with torch.no_grad():
            self.gate_logits.copy_(best)
        self.history = history
        self.__dict__["_trained"] = True
        return history

    # ------------------------------------------------------------------ selection
    def plan(self) -> tuple[torch.Tensor, float]:
        """Keep-mask over all group channels meeting the FLOPs target, and the gate threshold used."""
        counter = self._ensure_graph(None)
        if not self.__dict__.get("_trained"):
            # Untrained gates are all equal: the ranking would be the layer order, not a choice.
            raise RuntimeError("autobot: the gates are untrained; call pm.pruner.train_gates(batches) before prune()")
        logits = self.gate_logits.detach().cpu().double()
        protected = torch.zeros(counter.total, dtype=torch.bool)
        for g, off in zip(counter.groups, counter.offsets, strict=True):
            protected[off + int(logits[off : off + g.num_gates].argmax())] = True  # >= 1 channel per group
        order = [int(i) for i in torch.argsort(logits, stable=True) if not protected[i]]
        target = self.target_flops(counter)

        def keep_for(k: int) -> torch.Tensor:  # prune the k lowest-ranked channels
            keep = torch.ones(counter.total, dtype=torch.bool)
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
        keep = keep_for(lo)
        # One threshold moves in whole channels, and one channel of an early, wide layer can be worth a few
        # percent of the FLOPs. Fill the gap: give back the highest-gated removed channels that still fit,
        # until the FLOPs are within refill_tolerance of the target (or max_refill channels were tried).
        flops = counter.keep_flops(keep)
        tried = 0
        for i in reversed(order[:lo]):
            if flops >= (1 - _REFILL_TOLERANCE) * target or tried >= _MAX_REFILL:
                break
            tried += 1
            keep[i] = True
            candidate = counter.keep_flops(keep)
            if candidate <= target:
                flops = candidate
            else:
                keep[i] = False
        return keep, threshold

    @torch.no_grad()
    def prune_structured(self) -> StructuredReport:
        counter = self._ensure_graph(None)
        model = self.root
        example = self.__dict__["_example_input"]
        keep, threshold = self.plan()
        was_training = model.training
        model.eval()
        runs = self.config.latency_runs
        params_before, flops_before = count_params(model), counter.dense
        latency_before = measure_latency(model, example, runs) if runs else None
        before = snapshot(model)
        # Removal is transactional: any failure (torch-pruning raising, a layer narrowed other than planned,
        # a pruned model that no longer runs) rolls the model back to exactly what it was, then raises.
        rows, flops_after = remove_or_roll_back(
            "autobot",
            model,
            self.__dict__["_graph"][0],  # the graph too: a retry uses it again
            lambda: self._remove(counter, keep, example),
            on_rollback=lambda: model.train(was_training),
        )
        planned = counter.keep_flops(keep)
        warn_if_off_plan("autobot", model, flops_after, planned)
        latency_after = measure_latency(model, example, runs) if runs else None
        model.train(was_training)
        self.__dict__["_structure"] = structure_diff(before, model)
        # The graph and gates describe the dense model; a second prune() would need new ones.
        self.__dict__["_counter"] = None
        self.gate_logits = None
        self.__dict__["_trained"] = False
        return StructuredReport(
            method=self.name,
            flops_target=self.config.flops_target,
            target_flops=self.target_flops(counter),
            input_size=list(example.shape[1:]),
            params_before=params_before,
            params_after=count_params(model),
            flops_before=flops_before,
            flops_after=flops_after,
            latency_ms_before=latency_before,
            latency_ms_after=latency_after,
            threshold=threshold,
            groups=rows,
            planned_flops=planned,
        )

    def _remove(
        self, counter: GatedCounter, keep: torch.Tensor, example: torch.Tensor
    ) -> tuple[list[dict[str, Any]], float]:
        """Physically remove the channels ``keep`` drops; returns per-group rows and the measured FLOPs."""
        model = self.root
        graph, handlers = self.__dict__["_graph"]
        shapes = parameter_shapes(model)
        rows = []
        for g, off, (root_module, handler) in zip(counter.groups, counter.offsets, handlers, strict=True):
            group_keep = keep[off : off + g.num_gates].repeat(g.tied)  # root channel r has gate r % num_gates
            drop = [int(i) for i in torch.nonzero(~group_keep).flatten()]
            if drop:
                graph.get_pruning_group(root_module, handler, drop).prune()
            rows.append({"root": g.root, "channels": g.size, "kept": int(group_keep.sum())})
        follow_parameter_shapes(model, shapes)
        clear_attention_caches(model)
        self._check_plan(counter, keep)
        failure = failing_module(model, example)
        if failure is not None:
            where, kind, error = failure
            raise StructuredPruneError(
                f"autobot: the pruned {type(model).__name__} no longer runs: {where} fails with "
                f"{type(error).__name__}: {error}. torch-pruning does not narrow {kind} consistently; leave its "
                f"layers out with exclude_modules=[...]. The model was left unchanged."
            ) from error
        return rows, measure_flops(model, example)

    def _check_plan(self, counter: GatedCounter, keep: torch.Tensor) -> None:
        """Every layer must have exactly the planned channels: shape checks alone miss partial removals."""
        modules = dict(self.root.named_modules())
        for name, index in counter.out_maps.items():
            flat_keep = torch.cat([keep, keep.new_ones(1)])
            expected = int(flat_keep[index].sum())
            module = modules[name]
            n = module.out_features if isinstance(module, nn.Linear) else module.out_channels
            if n != expected:
                raise StructuredPruneError(
                    f"autobot: layer {name!r} has {n} output channels after pruning where the plan keeps {expected} "
                    f"of {len(index)}; torch-pruning does not handle {type(module).__name__} here as planned. "
                    "The model was left unchanged."
                )

    def structure(self) -> dict[str, Any] | None:
        """The rebuild record of the last ``prune()`` (see ``timm_prune.structured.structure_diff``)."""
        return self.__dict__.get("_structure")
