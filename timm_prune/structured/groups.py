"""Channel groups: channels coupled across layers (residual adds, concatenations, depthwise / grouped convs, the
residual stream of ViTs) that are kept or removed together, from torch-pruning's dependency graph.

A group is rooted at a targeted Conv2d / Linear; a group any of whose output-side layers is not targeted (the
stem, the classifier) stays whole, and so do the q/k/v outputs of attention modules (head counts never change).
``removal.drop_unremovable_groups`` tries each group's removal once on the model and leaves whole the ones
torch-pruning does not remove consistently.
"""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn

from .rules import FOLD, folded, folding_pruners, is_folding


@dataclass
class ChannelGroup:
    """Channels coupled across layers (residual adds, concats, depthwise convs) that are kept or removed together.

    ``root`` / ``size``: the module whose output channels index the group, and how many it has. ``inputs`` and
    ``outputs``: per Conv2d/Linear, ``(module name, local channel indices, root channel indices)`` for the
    input / output channels of that module that belong to the group.
    """

    root: str
    size: int
    # Grouped convs (1 < groups < channels) keep their group count, so every conv group must lose the same
    # channels: root channels r and r + k * size / tied share one gate.
    tied: int = 1
    inputs: list[tuple[str, list[int], list[int]]] = field(default_factory=list)
    outputs: list[tuple[str, list[int], list[int]]] = field(default_factory=list)

    @property
    def num_gates(self) -> int:
        return self.size // self.tied


def channels(module: nn.Module, side: str) -> int:
    """Input (``side="in"``) or output channels of a Conv2d / Linear."""
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    return module.in_channels if side == "in" else module.out_channels


def is_counted(module: nn.Module) -> bool:
    """The layers whose channels are gated, counted and removed: Conv2d and Linear."""
    return isinstance(module, (nn.Conv2d, nn.Linear))


def _attention_inner(model: nn.Module) -> set[nn.Module]:
    """Linear/conv layers inside attention modules whose outputs are split into heads (qkv, q, kv, ...).

    Their output channels stay fixed: removing them would need per-head bookkeeping (num_heads / head_dim)
    that torch-pruning only partly automates; ``proj`` (the output projection) is an ordinary layer.
    """
    inner: set[nn.Module] = set()
    for module in model.modules():
        # Innermost holders of num_heads only: blocks and stages that also record it (Swin-V2) keep their MLPs.
        if hasattr(module, "num_heads") and not any(hasattr(m, "num_heads") for m in list(module.modules())[1:]):
            for child_name, child in module.named_children():
                if child_name != "proj":  # q/k/v may sit in wrappers (LeViT's LinearNorm, Sequentials)
                    inner.update(m for m in child.modules() if is_counted(m))
    return inner


def build_groups(
    model: nn.Module, example: torch.Tensor, prunable: dict[str, nn.Module]
) -> tuple[Any, list[ChannelGroup], dict[ChannelGroup, Any]]:
    """Dependency graph of ``model`` and its channel groups whose output-side layers are all in ``prunable``.

    Returns ``(graph, groups, handlers)``; ``handlers[i]`` is ``(root module, pruning function)`` of group ``i``.
    """
    try:
        import torch_pruning as tp
    except ImportError as e:  # pragma: no cover - a dependency
        raise ImportError("structured pruning needs torch-pruning (pip install torch-pruning)") from e

    names = {module: name for name, module in model.named_modules()}
    keep_fixed = [m for m in model.modules() if is_counted(m) and m not in set(prunable.values())]
    keep_fixed += list(_attention_inner(model))
    # Patch merging (4C folds) is one node with its own pruner; its output side is its reduction Linear.
    customized = folding_pruners(model)
    keep_fixed += [m for m in model.modules() if is_folding(m) and m.reduction in keep_fixed]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "unwrapped parameters" (pos_embed, cls_token): handled on the last dim
        try:
            graph = tp.DependencyGraph().build_dependency(
                model, example_inputs=example, customized_pruners=customized or None
            )
        except Exception as e:
            raise ValueError(
                f"structured pruning: torch-pruning could not trace {type(model).__name__} ({type(e).__name__}: {e})"
            ) from e
        # torch-pruning's get_all_groups, with a bound on each group's search (ReXNet's never ends otherwise).
        raw, unsettled = all_groups(graph, keep_fixed, (nn.Conv2d, nn.Linear))
    if unsettled:
        warnings.warn(
            f"structured pruning: {unsettled} channel group(s) of {type(model).__name__} are left whole: their "
            "search in torch-pruning did not settle (residual adds over part of the channels)",
            stacklevel=3,
        )
    groups, handlers = [], []
    for group in raw:
        root_module, handler = group[0].dep.target.module, group[0].dep.handler
        size = len(group[0].idxs)
        cg = ChannelGroup(root=names[root_module], size=size)
        if any(r is None for item in group for r in item.root_idxs):
            continue  # torch-pruning could not map some channels back to the root: leave the group whole
        for item in group:
            module = item.dep.target.module
            side = "out" if graph.is_out_channel_pruning_fn(item.dep.handler) else "in"
            local, root = list(map(int, item.idxs)), list(map(int, item.root_idxs))
            if is_folding(module) and module in names:
                # The folded 4C axis of its reduction carries channel c at k * C + c.
                if side == "in":
                    local, root = folded(local, module.reduction.in_features // FOLD), root * FOLD
                module = module.reduction
            if not isinstance(module, nn.Module) or not is_counted(module) or module not in names:
                continue
            entry = (names[module], local, root)
            if max(entry[1]) >= channels(module, side) or max(entry[2]) >= size:
                # Index spaces that do not line up with the layer (uneven q/k/v splits, LeViT / EfficientViT
                # attention): counting or gating them would be wrong, so the group stays whole.
                cg = None
                break
            (cg.outputs if side == "out" else cg.inputs).append(entry)
        if cg is None:
            continue
        for item in group:
            module = item.dep.target.module
            if isinstance(module, nn.Conv2d) and 1 < module.groups < module.in_channels:
                cg.tied = max(cg.tied, module.groups)
        if size % cg.tied:  # grouped convs that do not split this group evenly: leave it whole
            continue
        if cg.num_gates > 1:  # a single gate cannot lose anything (at least one is kept)
            groups.append(cg)
            handlers.append((root_module, handler))
    return graph, groups, handlers


class GroupSearchOverflow(RuntimeError):
    """torch-pruning's search for one channel group did not settle; ``modules``: what it had reached."""

    def __init__(self, message: str, modules: list[Any]) -> None:
        super().__init__(message)
        self.modules = modules


@contextlib.contextmanager
def bounded_group_search(num_nodes: int) -> Iterator[None]:
    """Stop torch-pruning's channel-group search when one group grows far beyond the size of the graph.

    The search revisits a layer whenever it arrives with other channel indices. Partial-channel residual adds
    (ReXNet's ``x[:, :c] += shortcut``) map indices through slices that never settle, and the search runs for
    hours. Real groups stay within a few entries per graph node (measured: at most 2.7 x the node count over
    the tested timm families); past ``max(2000, 10 x nodes)`` entries ``GroupSearchOverflow`` is raised.
    """
    from torch_pruning.dependency import group as tp_group

    limit = max(2000, 10 * num_nodes)
    original = tp_group.Group.add_dep

    def add_dep(self, dep, idxs):  # noqa: ANN001 - torch-pruning's own signature
        if len(self._group) >= limit:
            raise GroupSearchOverflow(
                f"torch-pruning's channel-group search did not settle (a group passed {limit} dependencies); this "
                "happens with residual adds over part of the channels (e.g. ReXNet's x[:, :c] += shortcut)",
                [d.target.module for d, _ in self._group],
            )
        return original(self, dep, idxs)

    tp_group.Group.add_dep = add_dep
    try:
        yield
    finally:
        tp_group.Group.add_dep = original


def all_groups(graph: Any, ignored: list[nn.Module], root_types: tuple[type, ...]) -> tuple[list[Any], int]:
    """torch-pruning's ``get_all_groups`` with a bounded search per group: ``(groups, number of unsettled)``.

    A group whose search does not settle is left whole, and so is every layer it had reached (they would only
    lead into the same search again); the rest of the model is still grouped.
    """
    ignored_set = set(ignored) | set(graph.IGNORED_LAYERS_IN_TRACING)
    visited: set[Any] = set()
    groups, unsettled = [], 0
    for module in list(graph.module2node):
        if module in ignored_set or module in visited or not isinstance(module, root_types):
            continue
        pruner = graph.get_pruner_of_module(module)
        if pruner is None or pruner.get_out_channels(module) is None:
            continue
        try:
            with bounded_group_search(len(graph.module2node)):
                group = graph.get_pruning_group(
                    module, pruner.prune_out_channels, list(range(pruner.get_out_channels(module)))
                )
        except GroupSearchOverflow as overflow:
            unsettled += 1
            reached = [m for m in overflow.modules if isinstance(m, nn.Module)]
            visited.update(reached)
            ignored_set.update(reached)
            continue
        prunable = True
        for dep, _ in group:
            if graph.is_out_channel_pruning_fn(dep.handler):
                visited.add(dep.target.module)
                prunable = prunable and dep.target.module not in ignored_set
        if prunable:
            groups.append(group)
    return groups, unsettled
