"""Module-type rules for channel removal that torch-pruning's tracer cannot infer.

Patch merging (Swin, Swin-V2, Swin-V2-CR): ``x.reshape(B, H/2, 2, W/2, 2, C).permute(...).flatten(3)`` folds
2 x 2 positions into ``4C`` channels, channel ``c`` landing at ``k * C + c`` for ``k = 0..3`` (``C`` stays the
innermost axis), then ``reduction`` (Linear 4C -> out) and a LayerNorm on either side. torch-pruning maps the
channels through the reshape one to one, which narrows ``reduction`` by 1 where the input lost 4. The rule
makes such a module one node of the graph, whose input channels are ``C`` and output channels ``out``, and
narrows its inner layers itself. A module qualifies by type and structure: a ``*Merg*`` class with a
``reduction`` Linear over ``4C`` inputs and a ``norm`` LayerNorm on either side; nothing is keyed on model names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch.nn as nn

FOLD = 4  # 2 x 2 positions per output position


def _is_folding(module: nn.Module) -> bool:
    reduction, norm = getattr(module, "reduction", None), getattr(module, "norm", None)
    if "Merg" not in type(module).__name__ or not isinstance(reduction, nn.Linear) or reduction.in_features % FOLD:
        return False
    dim = getattr(module, "dim", None)
    if isinstance(dim, int) and reduction.in_features != FOLD * dim:
        return False
    return isinstance(norm, nn.Identity) or (
        isinstance(norm, nn.LayerNorm)
        and tuple(norm.normalized_shape) in {(reduction.in_features,), (reduction.out_features,)}
    )


def folded(idxs: Sequence[int], channels: int) -> list[int]:
    """Indices of the folded ``4C`` axis that carry the input channels ``idxs`` (of ``channels``)."""
    return [k * channels + int(i) for k in range(FOLD) for i in idxs]


def folding_pruners(model: nn.Module) -> dict[type, Any]:
    """``customized_pruners`` for torch-pruning: one pruner per patch-merging module class found in ``model``."""
    classes = {type(m) for m in model.modules() if _is_folding(m)}
    # Only classes all of whose instances qualify: a pruner is registered per class.
    classes = {c for c in classes if all(_is_folding(m) for m in model.modules() if type(m) is c)}
    if not classes:
        return {}
    pruner = _folding_pruner()
    return {cls: pruner for cls in classes}


def _folding_pruner() -> Any:
    import torch_pruning as tp

    linear, norm = tp.pruner.function.LinearPruner(), tp.pruner.function.LayernormPruner()

    class FoldingPruner(tp.pruner.function.BasePruningFunc):
        TARGET_MODULES = None

        def prune_in_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            wide = folded(idxs, layer.reduction.in_features // FOLD)
            if isinstance(layer.norm, nn.LayerNorm) and layer.norm.normalized_shape[0] == layer.reduction.in_features:
                norm.prune_out_channels(layer.norm, wide)
            linear.prune_in_channels(layer.reduction, wide)
            if isinstance(getattr(layer, "dim", None), int):
                layer.dim -= len(idxs)
            return layer

        def prune_out_channels(self, layer: nn.Module, idxs: Sequence[int]) -> nn.Module:
            if isinstance(layer.norm, nn.LayerNorm) and layer.norm.normalized_shape[0] == layer.reduction.out_features:
                norm.prune_out_channels(layer.norm, idxs)
            linear.prune_out_channels(layer.reduction, idxs)
            if isinstance(getattr(layer, "out_dim", None), int):
                layer.out_dim -= len(idxs)
            return layer

        def get_in_channels(self, layer: nn.Module) -> int:
            return layer.reduction.in_features // FOLD

        def get_out_channels(self, layer: nn.Module) -> int:
            return layer.reduction.out_features

    return FoldingPruner()


def is_folding(module: Any) -> bool:
    """Whether ``module`` is handled by the patch-merging rule (its group entries map to ``reduction``)."""
    return isinstance(module, nn.Module) and _is_folding(module)
