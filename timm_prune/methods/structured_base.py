"""``StructuredMethod``: what every channel-removing method shares (AutoBot, PSAP).

A structured method traces the wrapped model once into a ``ChannelGraph`` (channel groups, gate maps, a FLOPs
count over the gates) at an example input, chooses which gates to keep (``plan_removal``, the method's own
part), and ``prune()`` then removes the dropped channels physically, transactionally: any failure restores the
model exactly and raises ``StructuredPruneError``. The report gives params, FLOPs and CPU latency before and
after; the structure record rebuilds the narrowed model on load. No recovery applies once channels are gone.

Options shared by structured methods (``StructuredOptions``): ``flops_target``, ``input_size``, ``latency_runs``.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ..reports import StructuredReport
from ..structured.graph import ChannelGraph, trace_channels
from ..structured.measure import count_params, paired_latency
from ..structured.record import snapshot, structure_diff
from ..structured.removal import remove_channels, remove_or_roll_back, warn_if_off_plan
from .base import PruneMethod, check_input_size, is_int, is_number


def check_flops_target(value: Any, optional: bool) -> None:
    """``flops_target``: a fraction in (0, 1) of the dense FLOPs, or absolute MFLOPs > 1 (or ``None`` if optional)."""
    if value is None and optional:
        return
    if not is_number(value) or value <= 0 or value == 1:
        prefix = "None, " if optional else ""
        raise ValueError(
            f"PruneConfig.flops_target must be {prefix}a fraction in (0, 1) of the dense FLOPs or MFLOPs > 1; "
            f"got {value!r}"
        )


@dataclass
class StructuredOptions:
    """Fields every structured method has (its own options dataclass extends this one)."""

    # (C, H, W) used to trace the model and count FLOPs; None: the first batch's size, else pretrained_cfg.
    input_size: list[int] | None = None
    # Timed forward passes (batch 1, CPU) for the latency figures of the report; 0 skips the measurement.
    latency_runs: int = 10

    def __post_init__(self) -> None:
        self.input_size = check_input_size(self.input_size)
        if not is_int(self.latency_runs) or self.latency_runs < 0:
            raise ValueError(f"PruneConfig.latency_runs must be an integer >= 0; got {self.latency_runs!r}")


class StructuredMethod(PruneMethod):
    """Base of channel-removing methods: the trace, the FLOPs target, transactional removal and the report.

    A subclass implements ``plan_removal()`` (the gates to keep, and its report fields) and may override the
    hooks around removal (``detach_for_removal`` / ``reattach_after_rollback`` / ``after_removal``).
    """

    structured = True
    supports_recovery = False
    # Weight-level settings: structured methods select channels, train no penalty, and leave nothing to recover.
    unused_fields = ("scope", "recovery", "penalty_weight", "pattern")
    report_cls = StructuredReport
    # Try each group's removal once at trace time and leave whole the groups torch-pruning does not remove
    # consistently (with a warning); without it, such a group fails at prune() (and is rolled back).
    trial_removal: ClassVar[bool] = False

    def __init__(self, config: Any, model: nn.Module) -> None:
        super().__init__(config, model)
        self._graph: ChannelGraph | None = None  # describes the dense model: dropped once channels are removed
        self._structure: dict[str, Any] | None = None  # the rebuild record, once channels are removed

    # ------------------------------------------------------------------ trace
    @property
    def channel_graph(self) -> ChannelGraph | None:
        """The trace of the dense model (``None`` before the first trace and after removal)."""
        return self._graph

    @property
    def groups(self) -> list:
        return [] if self._graph is None else self._graph.groups

    def example_input(self, batch: torch.Tensor | None = None) -> torch.Tensor:
        """Batch of 1 for tracing and counting: ``batch``'s first sample, else seeded noise at ``input_size``
        (or the model's ``pretrained_cfg`` size). No global RNG draw, so training stays reproducible."""
        params = next(self.model.parameters())
        if batch is not None and self.config.input_size is None:
            with torch.inference_mode(False):
                return batch[:1].detach().clone().to(device=params.device, dtype=params.dtype)
        size = self.config.input_size
        if size is None:
            cfg = getattr(self.model, "pretrained_cfg", None) or {}
            size = list(cfg.get("input_size", (3, 224, 224)))
        return torch.randn(1, *size, generator=torch.Generator().manual_seed(0)).to(params.device)

    def trace(self, batch: torch.Tensor | None = None) -> ChannelGraph:
        """Trace the model (at ``batch``'s size, see ``example_input``) into ``channel_graph``."""
        self._graph = trace_channels(
            self.model, self.example_input(batch), self.layers, self.name, trial_removal=self.trial_removal
        )
        return self._graph

    def ensure_graph(self, batch: torch.Tensor | None = None) -> ChannelGraph:
        return self._graph if self._graph is not None else self.trace(batch)

    def target_flops(self, dense: float | None = None) -> float:
        """The FLOPs budget of ``flops_target`` (2 x MACs per image at the traced input size)."""
        t = self.config.flops_target
        dense = self.ensure_graph().flops.dense if dense is None else dense
        return t * dense if t < 1 else t * 1e6

    # ------------------------------------------------------------------ removal
    def plan_removal(self) -> tuple[torch.Tensor, dict[str, Any]]:
        """The gates to keep (bool over all gates of ``channel_graph``) and extra fields of the report."""
        raise NotImplementedError

    def detach_for_removal(self) -> None:
        """Before channels are removed (channel indices are about to change): take off what indexes them."""

    def reattach_after_rollback(self) -> None:
        """A failed removal was rolled back: put back what ``detach_for_removal`` took off."""

    def after_removal(self) -> None:
        """Channels are gone: drop the state that described the dense model."""

    @torch.no_grad()
    def prune_structured(self) -> StructuredReport:
        state = self.ensure_graph()
        keep, extra = self.plan_removal()
        model, example, runs = self.model, state.example, self.config.latency_runs
        was_training = model.training
        model.eval()
        self.detach_for_removal()
        params_before, flops_before = count_params(model), state.flops.dense
        # A dense copy to time against the narrowed model, interleaved (measure.paired_latency).
        dense_copy = copy.deepcopy(model) if runs else None
        before = snapshot(model)

        def on_rollback() -> None:
            self.reattach_after_rollback()
            model.train(was_training)

        # Transactional: any failure (torch-pruning raising, a layer narrowed other than planned, a pruned model
        # that no longer runs) rolls the model (and torch-pruning's graph, for a retry) back, then raises.
        rows, flops_after = remove_or_roll_back(
            self.name, model, state.graph, lambda: remove_channels(state, keep, self.name), on_rollback
        )
        planned = state.flops.keep_flops(keep)
        warn_if_off_plan(self.name, model, flops_after, planned)
        latency = paired_latency(dense_copy, model, example, runs) if dense_copy is not None else {}
        del dense_copy
        model.train(was_training)
        self._structure = structure_diff(before, model)
        self._graph = None
        self.after_removal()
        target = flops_after if self.config.flops_target is None else self.target_flops(flops_before)
        return self.report_cls(
            method=self.name,
            flops_target=self.config.flops_target,
            target_flops=target,
            input_size=list(example.shape[1:]),
            params_before=params_before,
            params_after=count_params(model),
            flops_before=flops_before,
            flops_after=flops_after,
            latency_ms_before=latency.get("dense_ms"),
            latency_ms_after=latency.get("pruned_ms"),
            speedup_median=latency.get("speedup"),
            speedup_q1=latency.get("speedup_q1"),
            speedup_q3=latency.get("speedup_q3"),
            latency_threads=latency.get("threads"),
            groups=rows,
            planned_flops=planned,
            **extra,
        )

    def structure(self) -> dict[str, Any] | None:
        """The rebuild record of the last ``prune()`` (see ``timm_prune.structured.record.structure_diff``)."""
        return self._structure

    def load_structure(self, record: dict[str, Any]) -> None:
        self._structure = record
        self._graph = None
