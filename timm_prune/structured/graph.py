"""PSAP's view of a model's channel groups: which filter every input / output channel of every conv and linear
belongs to, per-filter statistics of the weights, and physical removal of the pruned filters checked against
the plan. Built on ``structured.build_groups`` (torch-pruning's dependency graph); ``remove_channels`` and
``check_plan`` are generic and could move to ``structured.py`` (AutoBot does the same removal inline).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .structured import GatedCounter, build_groups


@dataclass
class ChannelGraph:
    """Groups, their pruning handlers, the flat filter layout and per-layer channel -> filter maps.

    A filter is one gate of a ``ChannelGroup``: group ``i`` owns filters ``layout[i][0] .. + layout[i][1]``. In
    ``in_maps`` / ``out_maps`` a channel outside every group maps to ``total``.
    """

    graph: Any
    groups: list
    handlers: list
    layout: list[tuple[int, int]]
    example: torch.Tensor
    counter: GatedCounter
    in_maps: dict[str, torch.Tensor]
    out_maps: dict[str, torch.Tensor]
    modules: dict[str, nn.Module]
    handles: list = field(default_factory=list)  # the method's gate hooks, removed before channels are

    @property
    def total(self) -> int:
        return sum(n for _, n in self.layout)


def build_channel_graph(model: nn.Module, example: torch.Tensor, prunable: dict[str, nn.Module]) -> ChannelGraph:
    """Trace ``model`` (in eval mode, with autograd, without autocast) and map its channels to filters."""
    was_training = model.training
    model.eval()
    try:
        # torch-pruning traces through autograd; the caller may be inside no_grad, inference_mode or autocast.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(example.device.type, enabled=False):
            graph, groups, handlers = build_groups(model, example, prunable)
            if not groups:
                raise ValueError(
                    f"psap: no prunable channel group in {type(model).__name__} with these target_modules "
                    "(every group touches a non-targeted layer such as the stem or the classifier)"
                )
            counter = GatedCounter(model, groups, example)
    finally:
        model.train(was_training)
    layout, total = [], 0
    for g in groups:
        layout.append((total, g.num_gates))
        total += g.num_gates
    modules = dict(model.named_modules())
    maps: dict[str, dict[str, torch.Tensor]] = {"in": {}, "out": {}}
    for g, (off, n) in zip(groups, layout, strict=True):
        for side, entries in (("in", g.inputs), ("out", g.outputs)):
            for name, local, root_idx in entries:
                index = maps[side].setdefault(name, torch.full((channels(modules[name], side),), total))
                index[torch.tensor(local)] = torch.tensor(root_idx) % n + off  # tied channels share a filter
    return ChannelGraph(graph, groups, handlers, layout, example, counter, maps["in"], maps["out"], modules)


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


def remove_channels(state: ChannelGraph, keep: torch.Tensor) -> list[dict[str, Any]]:
    """Physically remove the filters not in ``keep`` (bool over all filters); returns per-group channel counts."""
    rows = []
    for g, (off, n), (root_module, handler) in zip(state.groups, state.layout, state.handlers, strict=True):
        group_keep = keep[off : off + n].repeat(g.tied)  # root channel r is filter r % n
        drop = [int(i) for i in torch.nonzero(~group_keep).flatten()]
        if drop:
            state.graph.get_pruning_group(root_module, handler, drop).prune()
        rows.append({"root": g.root, "channels": g.size, "kept": int(group_keep.sum())})
    check_plan(state, keep)
    return rows


def check_plan(state: ChannelGraph, keep: torch.Tensor) -> None:
    """Every producing layer must have exactly the planned channels (shape checks miss partial removals)."""
    flat = torch.cat([keep, keep.new_ones(1)])
    for name, index in state.out_maps.items():
        module = state.modules[name]
        n = channels(module, "out")
        expected = int(flat[index].sum())
        if n != expected:
            raise RuntimeError(
                f"psap: layer {name!r} has {n} output channels after pruning where the plan keeps {expected} of "
                f"{len(index)}; torch-pruning does not handle {type(module).__name__} here as planned"
            )


def channels(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    return module.in_channels if side == "in" else module.out_channels
