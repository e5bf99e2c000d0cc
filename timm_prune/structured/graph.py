"""One trace of a model for a structured method: channel groups, torch-pruning's handlers to remove them, where
each channel's gate sits, and the FLOPs count over those gates (what AutoBot and PSAP both start from).

A *gate* (PSAP: a *filter*) is one channel of a ``ChannelGroup``: group ``i`` owns gates ``layout[i][0] ..
+ layout[i][1]``; in ``in_maps`` / ``out_maps`` a channel outside every group maps to ``total``.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .gates import GateMaps, gate_maps
from .groups import ChannelGroup, build_groups
from .measure import FlopsCounter
from .removal import drop_unremovable_groups


@dataclass
class ChannelGraph:
    model: nn.Module
    graph: Any  # torch-pruning's DependencyGraph (its pruning groups remove the channels)
    groups: list[ChannelGroup]
    handlers: list[tuple[nn.Module, Any]]  # per group: (root module, torch-pruning pruning function)
    maps: GateMaps
    example: torch.Tensor  # batch of 1 at the traced input size
    flops: FlopsCounter
    modules: dict[str, nn.Module]

    @property
    def layout(self) -> list[tuple[int, int]]:
        return self.maps.spans

    @property
    def total(self) -> int:
        return self.maps.total

    @property
    def in_maps(self) -> dict[str, torch.Tensor]:
        return self.maps.in_maps

    @property
    def out_maps(self) -> dict[str, torch.Tensor]:
        return self.maps.out_maps


def trace_channels(
    model: nn.Module, example: torch.Tensor, prunable: dict[str, nn.Module], method: str, trial_removal: bool
) -> ChannelGraph:
    """Trace ``model`` (in eval mode, with autograd, without autocast) into its ``ChannelGraph``.

    ``trial_removal``: try each group's removal once and leave whole (with a warning) the groups torch-pruning
    does not remove consistently. Raises ``ValueError`` when no group is prunable.
    """
    was_training = model.training
    model.eval()
    try:
        # torch-pruning traces through autograd; the caller may be inside no_grad, inference_mode or autocast.
        with torch.inference_mode(False), torch.enable_grad(), torch.autocast(example.device.type, enabled=False):
            graph, groups, handlers = build_groups(model, example, prunable)
            dropped: list[str] = []
            if trial_removal:
                groups, handlers, dropped = drop_unremovable_groups(model, graph, groups, handlers, example)
            if dropped:
                warnings.warn(
                    f"{method}: {len(dropped)} channel group(s) of {type(model).__name__} stay whole: torch-pruning "
                    f"does not remove them consistently (rooted at {', '.join(dropped[:4])}"
                    f"{', ...' if len(dropped) > 4 else ''})",
                    stacklevel=4,
                )
            if not groups:
                raise ValueError(
                    f"{method}: no prunable channel group in {type(model).__name__} with these target_modules "
                    "(every group touches a non-targeted layer such as the stem or the classifier, or has channel "
                    "indices torch-pruning cannot map, such as GLU halves)"
                )
            maps = gate_maps(model, groups)
            flops = FlopsCounter(model, maps, example)
    finally:
        model.train(was_training)
    return ChannelGraph(model, graph, groups, handlers, maps, example, flops, dict(model.named_modules()))
