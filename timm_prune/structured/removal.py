"""Safety around physical channel removal: an in-place backup that rolls a half-pruned model back, a bound on
torch-pruning's channel-group search, derived attributes that must follow a pruned parameter, and locating the
module where a pruned model stops running.

Kept apart from ``structured.py`` (groups, FLOPs, rebuild record) so that each stays small.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

import torch
import torch.nn as nn

T = TypeVar("T")


class StructuredPruneError(RuntimeError):
    """Channel removal failed; the model was rolled back to exactly what it was before ``prune()``."""


class ModelBackup:
    """In-place snapshot of every module's attributes and tensors, restored by ``restore()``.

    torch-pruning narrows a model by assigning new ``nn.Parameter`` / buffer objects and new attribute values
    (``in_channels``, ``normalized_shape``, ...). Keeping each module's attribute dict (with copies of its
    ``_parameters`` / ``_buffers`` / ``_modules`` dicts) and each tensor's ``.data`` undoes all of it while the
    user keeps the very same module and parameter objects (optimizers, hooks, DDP wrappers stay valid). This
    costs no tensor copies, unlike a ``deepcopy`` of the model.
    """

    _DICTS = ("_parameters", "_buffers", "_modules")

    def __init__(self, model: nn.Module, graph: Any = None) -> None:
        # torch-pruning's graph re-keys unwrapped parameters (pos_embed, cls_token) to their pruned copies and
        # records a history: both are put back too, so the same graph can prune the restored model again.
        self.graph = graph
        if graph is not None:
            self.graph_maps = (dict(graph.module2node), dict(graph._param_to_name), list(graph._pruning_history))
            self.nodes = [(node, node.module) for node in graph.module2node.values()]
        self.modules: list[tuple[nn.Module, dict[str, Any]]] = []
        # torch-pruning's own op modules (concat / split / slice / reshape) keep channel sizes and offsets in
        # lists that its pruners edit in place: copy those lists too.
        own = set(model.modules())
        self.ops: list[tuple[nn.Module, dict[str, Any]]] = []
        if graph is not None:
            for node in graph.module2node.values():
                if isinstance(node.module, nn.Module) and node.module not in own:
                    self.ops.append((node.module, _copied_state(node.module)))
        self.tensors: list[tuple[torch.Tensor, torch.Tensor, bool]] = []
        for module in model.modules():
            saved = dict(vars(module))
            for key in self._DICTS:
                saved[key] = dict(saved[key])
            if isinstance(saved.get("_non_persistent_buffers_set"), set):
                saved["_non_persistent_buffers_set"] = set(saved["_non_persistent_buffers_set"])
            self.modules.append((module, saved))
            for tensor in list(module._parameters.values()) + list(module._buffers.values()):
                if tensor is not None:
                    self.tensors.append((tensor, tensor.data, tensor.requires_grad))

    def restore(self) -> None:
        if self.graph is not None:
            module2node, param_to_name, history = self.graph_maps
            self.graph.module2node.clear()
            self.graph.module2node.update(module2node)
            self.graph._param_to_name.clear()
            self.graph._param_to_name.update(param_to_name)
            self.graph._pruning_history[:] = history
            for node, module in self.nodes:
                node.module = module
            for op, saved in self.ops:
                vars(op).clear()
                vars(op).update(_copied_state(saved))
        for module, saved in self.modules:
            state = vars(module)
            state.clear()
            state.update(saved)
            for key in self._DICTS:  # fresh copies: the backup stays usable for a second restore
                state[key] = dict(saved[key])
        with torch.no_grad():
            for tensor, data, requires_grad in self.tensors:
                if tensor.data.data_ptr() != data.data_ptr() or tensor.shape != data.shape:
                    tensor.data = data
                tensor.requires_grad_(requires_grad)


def remove_or_roll_back(
    method: str, model: nn.Module, graph: Any, remove: Callable[[], T], on_rollback: Callable[[], None]
) -> T:
    """Run ``remove()`` (physical channel removal and its checks); on any failure restore ``model`` (and
    torch-pruning's ``graph``) exactly, call ``on_rollback`` (re-attach what the method took off), and raise
    ``StructuredPruneError`` naming the cause."""
    backup = ModelBackup(model, graph)
    try:
        return remove()
    except BaseException as e:
        backup.restore()
        on_rollback()
        if isinstance(e, Exception) and not isinstance(e, StructuredPruneError):
            raise StructuredPruneError(
                f"{method}: removing channels of {type(model).__name__} failed ({type(e).__name__}: {e}). "
                "The model was left unchanged."
            ) from e
        raise


def warn_if_off_plan(method: str, model: nn.Module, flops_after: float, planned: float) -> None:
    """The FLOPs count missed something this architecture computes (an op outside convs / linears that scales
    with channels): say so, since the target may be missed by the difference."""
    if abs(flops_after - planned) > 0.01 * planned:
        warnings.warn(
            f"{method}: the pruned {type(model).__name__} measures {flops_after / 1e6:.3f} MFLOPs where selection "
            f"planned {planned / 1e6:.3f}",
            stacklevel=4,
        )


def _copied_state(obj: Any) -> dict[str, Any]:
    """An object's attributes with its lists, tuples of lists and dicts copied one level deep."""
    state = obj if isinstance(obj, dict) else vars(obj)
    return {k: (list(v) if isinstance(v, list) else dict(v) if isinstance(v, dict) else v) for k, v in state.items()}


class GroupSearchOverflow(StructuredPruneError):
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


def follow_parameter_shapes(model: nn.Module, before: dict[str, tuple[int, ...]]) -> None:
    """Update ``shape`` attributes that mirror a parameter a removal narrowed (``before``: name -> old shape).

    Some modules keep the view shape of their parameter as a plain tuple (timm MetaFormer's ``Scale``:
    ``x * scale.view(self.shape)`` with ``shape = (dim, 1, 1)``); torch-pruning narrows the parameter but not
    the tuple. The rule is by structure, not by class: a tuple ``shape`` whose product was the numel of one of
    the module's own parameters follows that parameter's new size.
    """
    for name, module in model.named_modules():
        shape = getattr(module, "shape", None)
        if not isinstance(shape, (tuple, list)) or not shape or not all(isinstance(v, int) for v in shape):
            continue
        for pname, param in module.named_parameters(recurse=False):
            old = before.get(f"{name}.{pname}" if name else pname)
            if old is None or math.prod(shape) != math.prod(old) or param.numel() == math.prod(old):
                continue
            big = [i for i, v in enumerate(shape) if v != 1]
            if len(big) == 1:  # one channel axis; anything else is not a view shape we can follow
                new = list(shape)
                new[big[0]] = param.numel()
                module.shape = type(shape)(new)
            break


def parameter_shapes(model: nn.Module) -> dict[str, tuple[int, ...]]:
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def failing_module(model: nn.Module, example: torch.Tensor) -> tuple[str, str, Exception] | None:
    """Run ``model`` on ``example``; on an error, the innermost module that raised: ``(name, type, error)``."""
    names = {module: name for name, module in model.named_modules()}
    stack: list[nn.Module] = []
    failed: list[nn.Module] = []
    handles = []

    def pre(module: nn.Module, args: tuple) -> None:
        stack.append(module)

    def post(module: nn.Module, args: tuple, output: Any) -> None:
        if stack and stack[-1] is module:
            stack.pop()

    for module in names:
        handles.append(module.register_forward_pre_hook(pre))
        handles.append(module.register_forward_hook(post))
    try:
        with torch.no_grad():
            model(example[:1])
    except Exception as e:  # noqa: BLE001 - any error means the pruned model does not run
        failed = list(stack)
        inner = failed[-1] if failed else model
        # The innermost module that is not a plain leaf of torch (Linear, LayerNorm) names the culprit best.
        owner = next((m for m in reversed(failed) if type(m).__module__.split(".")[0] != "torch"), inner)
        label = f"{names[inner] or type(model).__name__} ({type(inner).__name__})"
        if owner is not inner:
            label += f" inside {names[owner] or type(model).__name__} ({type(owner).__name__})"
        return label, type(owner).__name__, e
    finally:
        for h in handles:
            h.remove()
    return None


def clear_attention_caches(model: nn.Module) -> None:
    """Drop cached attention biases (LeViT, EfficientFormer keep one per device, computed in eval mode) so
    that the next forward recomputes them from the current parameters."""
    for module in model.modules():
        if isinstance(getattr(module, "attention_bias_cache", None), dict):
            module.attention_bias_cache = {}
