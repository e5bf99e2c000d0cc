"""Bias correction after pruning: each pruned layer's output, per unit, gets back the mean it had before.

Pruning removes weights whose inputs do not average to zero, so every output unit shifts by a constant on average.
Networks with BatchNorm absorb that shift when the statistics are re-estimated; LayerNorm networks (ConvNeXt, ViT)
have nothing to re-estimate, and the shift travels down the residual stream. The correction (empirical bias
correction, after Nagel et al., "Data-Free Quantization Through Weight Equalization and Bias Correction", ICCV
2019, applied to pruning) measures each targeted layer's mean output per unit on a few batches of the dense
model, then, after pruning, layer by layer in the order they run, measures the pruned model's and adds the
difference to the layer's bias. Sequentially, so a layer is corrected for what it sees once every earlier layer
has been corrected: a shift that an earlier correction already removed is not counted twice.

Only layers with a bias are corrected (a conv followed by BatchNorm has none: re-estimate the statistics there).
A layer that runs several times in one forward is measured at its first call.

Restoring the mean alone can break a network when pruning has left a layer almost no signal: the restored constant
then swamps what is left, and a LayerNorm downstream cannot remove a per-unit constant. A ConvNeXt-atto pruned to
90 % by one global threshold keeps 0.1-2 % of its last stage; corrected, it fell from 30 % top-1 to chance, while the
same model's top-1 agreement with the dense model on the calibration batches fell from 33 % to 11 %. That agreement
tracks accuracy and needs no labels, so ``top1_agreement`` is the check ``PrunableModel.prune`` uses to keep the
correction only when it does not make the pruned model agree less with the dense one.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
import torch.nn as nn


class _Measured(Exception):
    """Raised by the hook once the layer being measured has run: the rest of the forward is not needed."""


def _unit_sum(module: nn.Module, output: torch.Tensor) -> tuple[torch.Tensor, int]:
    """Sum over everything but the output-unit axis (1 for a conv, the last for a Linear), and how many summed."""
    out = output.detach().to(torch.float64)
    dim = 1 if isinstance(module, nn.Conv2d) else out.dim() - 1
    total = out.movedim(dim, -1).reshape(-1, out.shape[dim])
    return total.sum(0), total.shape[0]


def has_bias(module: nn.Module) -> bool:
    """Whether the layer has a bias to correct."""
    return getattr(module, "bias", None) is not None


def output_means(
    forward: Callable[[torch.Tensor], Any],
    layers: dict[str, nn.Module],
    inputs: Sequence[torch.Tensor],
    names: Sequence[str] | None = None,
    outputs: list[Any] | None = None,
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Per-unit mean output (float64) of each layer in ``names`` (default: all) over ``inputs``, measured at each
    layer's first call per forward, and the names in the order the layers first ran (layers that never ran are
    left out). With a single name the forward stops as soon as that layer has run; otherwise each forward's output
    is appended to ``outputs`` when it is given (``top1_predictions`` reads them: no second pass)."""
    names = list(layers) if names is None else list(names)
    sums: dict[str, list] = {}
    order: list[str] = []
    seen: set[str] = set()
    stop_early = len(names) == 1

    def hook_for(name: str):
        def hook(module: nn.Module, args: Any, output: torch.Tensor) -> None:
            if name in seen:
                return
            seen.add(name)
            if name not in sums:
                order.append(name)
                sums[name] = [0.0, 0]
            total, count = _unit_sum(module, output)
            sums[name][0] = sums[name][0] + total
            sums[name][1] += count
            if stop_early:
                raise _Measured

        return hook

    handles = [layers[name].register_forward_hook(hook_for(name)) for name in names]
    try:
        for x in inputs:
            seen.clear()
            try:
                output = forward(x)
            except _Measured:  # only raised when stopping early
                continue
            if outputs is not None:
                outputs.append(output)
    finally:
        for handle in handles:
            handle.remove()
    return {name: total / count for name, (total, count) in sums.items()}, order


def top1_predictions(outputs: Sequence[Any]) -> list[torch.Tensor] | None:
    """The index of the largest output (argmax over the last axis) per example, for each batch of model outputs;
    ``None`` when the outputs are not ``(batch, classes)`` tensors, which leaves nothing to compare."""
    predictions = []
    for output in outputs:
        if not isinstance(output, torch.Tensor) or output.dim() != 2 or output.shape[-1] < 2:
            return None
        predictions.append(output.argmax(-1))
    return predictions


def top1_agreement(
    forward: Callable[[torch.Tensor], Any], inputs: Sequence[torch.Tensor], reference: Sequence[torch.Tensor]
) -> float:
    """Share of the examples of ``inputs`` whose top-1 prediction is the one in ``reference`` (``top1_predictions``
    of another model, e.g. the dense one, on the same inputs)."""
    matches, total = 0, 0
    for x, expected in zip(inputs, reference, strict=True):
        matches += int((forward(x).argmax(-1) == expected).sum())
        total += expected.numel()
    return matches / total


@torch.no_grad()
def correct_biases(
    forward: Callable[[torch.Tensor], Any],
    layers: dict[str, nn.Module],
    inputs: Sequence[torch.Tensor],
    reference: dict[str, torch.Tensor],
    order: Sequence[str],
) -> list[str]:
    """Add ``reference - measured`` mean output to the bias of each layer in ``order`` (``output_means``' names, all
    in ``reference``) that has one, one layer at a time, each measured after the earlier ones are corrected;
    returns the names of the corrected layers."""
    corrected = []
    for name in order:
        module = layers[name]
        if not has_bias(module):
            continue
        measured, _ = output_means(forward, layers, inputs, [name])
        if name not in measured:
            continue
        shift = reference[name] - measured[name]
        module.bias.add_(shift.to(device=module.bias.device, dtype=module.bias.dtype))
        # Under autocast the low-precision copy of the bias made by an earlier forward is cached until the
        # autocast region ends, and the next measurement (and the caller's forwards) would still run the old bias.
        torch.clear_autocast_cache()
        corrected.append(name)
    return corrected
