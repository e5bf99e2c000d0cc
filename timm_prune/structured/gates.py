"""Per-channel gates: where each channel's gate sits in one flat vector, and the forward pre-hook that applies it.

Group ``i`` owns gates ``spans[i][0] .. spans[i][0] + spans[i][1]``; channel ``r`` of a group with tied channels
(grouped convs) has gate ``r % num_gates``. Per Conv2d / Linear, ``in_maps`` / ``out_maps`` give each input /
output channel's gate index, and ``total`` (one past the last gate) for channels outside every group: the flat
vector the hooks read is the gates followed by a constant 1 (``with_constant``).

Gating the *inputs* of the layers that consume a channel is what removing it does to them, exactly for convs and
linears (a channel that enters only through them disappears when its gate is 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from .groups import ChannelGroup, channels


@dataclass
class GateMaps:
    spans: list[tuple[int, int]]  # per group: (first gate, number of gates)
    in_maps: dict[str, torch.Tensor]  # layer name -> gate index of each input channel
    out_maps: dict[str, torch.Tensor]  # layer name -> gate index of each output channel

    @property
    def total(self) -> int:
        return sum(n for _, n in self.spans)


def gate_maps(model: nn.Module, groups: list[ChannelGroup]) -> GateMaps:
    spans, total = [], 0
    for g in groups:
        spans.append((total, g.num_gates))
        total += g.num_gates
    modules = dict(model.named_modules())
    maps: dict[str, dict[str, torch.Tensor]] = {"in": {}, "out": {}}
    for g, (off, n) in zip(groups, spans, strict=True):
        for side, entries in (("in", g.inputs), ("out", g.outputs)):
            for name, local, root in entries:
                index = maps[side].setdefault(name, torch.full((channels(modules[name], side),), total))
                index[torch.tensor(local)] = torch.tensor(root) % n + off  # tied channels share a gate
    return GateMaps(spans, maps["in"], maps["out"])


def with_constant(gates: torch.Tensor) -> torch.Tensor:
    """The flat vector the hooks index: ``gates`` and a constant 1 for ungated channels."""
    return torch.cat([gates, gates.new_ones(1)])


def gate_hook(index: torch.Tensor, flat_gates: Callable[[], torch.Tensor | None]) -> Callable[..., Any]:
    """Forward pre-hook multiplying input channel ``c`` by ``flat_gates()[index[c]]`` (no-op while it is None)."""

    def hook(module: nn.Module, args: tuple) -> tuple | None:
        flat = flat_gates()
        if flat is None or not args:
            return None
        x = args[0]
        scale = flat[index if index.device == flat.device else index.to(flat.device)].to(x.dtype)
        if isinstance(module, nn.Conv2d):
            scale = scale.view(1, -1, 1, 1)
        return (x * scale,) + tuple(args[1:])

    return hook


def attach_gates(
    modules: dict[str, nn.Module],
    maps: GateMaps,
    flat_gates: Callable[[], torch.Tensor | None],
    device: torch.device | None = None,
) -> list[Any]:
    """Register ``gate_hook`` on every layer that consumes a gated channel; returns the hook handles.

    ``device``: where the gates will be (the index maps move there once, not on every forward).
    """
    return [
        modules[name].register_forward_pre_hook(gate_hook(index if device is None else index.to(device), flat_gates))
        for name, index in maps.in_maps.items()
    ]
