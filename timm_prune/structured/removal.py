"""Physical channel removal, transactional: ``remove_channels`` narrows the model as planned and checks it (every
layer has the planned channels, the model still runs); ``remove_or_roll_back`` restores the model exactly
(``ModelBackup``) on any failure and raises ``StructuredPruneError``. Also: derived attributes that must follow a
narrowed parameter, and locating the module where a pruned model stops running.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

import torch
import torch.nn as nn

from .groups import ChannelGroup, channels
from .measure import measure_flops

if TYPE_CHECKING:
    from .graph import ChannelGraph

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


def remove_channels(state: ChannelGraph, keep: torch.Tensor, method: str) -> tuple[list[dict[str, Any]], float]:
    """Physically remove the gates ``keep`` (bool over all gates) drops, then check the result.

    Returns per-group rows ``{"root", "channels", "kept"}`` and the measured FLOPs of the pruned model. Raises
    ``StructuredPruneError`` when a layer did not get the planned channels or the model no longer runs; run it
    inside ``remove_or_roll_back`` so that such a failure leaves the model as it was.
    """
    model = state.model
    shapes = parameter_shapes(model)
    rows = []
    for g, (off, n), (root_module, handler) in zip(state.groups, state.layout, state.handlers, strict=True):
        group_keep = keep[off : off + n].repeat(g.tied)  # root channel r has gate r % num_gates
        drop = [int(i) for i in torch.nonzero(~group_keep).flatten()]
        if drop:
            state.graph.get_pruning_group(root_module, handler, drop).prune()
        rows.append({"root": g.root, "channels": g.size, "kept": int(group_keep.sum())})
    follow_parameter_shapes(model, shapes)
    clear_attention_caches(model)
    check_plan(state, keep, method)
    failure = failing_module(model, state.example)
    if failure is not None:
        where, kind, error = failure
        raise StructuredPruneError(
            f"{method}: the pruned {type(model).__name__} no longer runs: {where} fails with "
            f"{type(error).__name__}: {error}. torch-pruning does not narrow {kind} consistently; leave its "
            f"layers out with exclude_modules=[...]. The model was left unchanged."
        ) from error
    return rows, measure_flops(model, state.example)


def check_plan(state: ChannelGraph, keep: torch.Tensor, method: str) -> None:
    """Every producing layer must have exactly the planned channels: shape checks alone miss partial removals."""
    flat = torch.cat([keep, keep.new_ones(1)])
    for name, index in state.out_maps.items():
        module = state.modules[name]
        n = module.out_features if isinstance(module, nn.Linear) else module.out_channels
        expected = int(flat[index].sum())
        if n != expected:
            raise StructuredPruneError(
                f"{method}: layer {name!r} has {n} output channels after pruning where the plan keeps {expected} "
                f"of {len(index)}; torch-pruning does not handle {type(module).__name__} here as planned. "
                "The model was left unchanged."
            )


def drop_unremovable_groups(
    model: nn.Module, graph: Any, groups: list[ChannelGroup], handlers: list[Any], example: torch.Tensor
) -> tuple[list[ChannelGroup], list[Any], list[str]]:
    """Keep only the groups whose removal torch-pruning carries out as the group says (a trial on the model).

    Each group loses one gate's channels; the model must still run, and every Conv2d/Linear of the group must
    lose exactly the channels its entries name. Where it fails (Swin-V2-CR's window attention, GhostNet's cheap
    operations, layers narrowed partly), the group stays whole, found by one
    trial of all groups and, only if that fails, one trial per group. The model is restored after each trial
    (``ModelBackup``). Returns ``(groups, handlers, roots of the dropped groups)``.
    """
    modules = dict(model.named_modules())

    def trial(indices: list[int]) -> bool:
        backup = ModelBackup(model, graph)
        try:
            expected: dict[tuple[str, str], int] = {}
            for i in indices:
                g = groups[i]
                dropped = set(range(g.num_gates - 1, g.size, g.num_gates))  # the last gate's channels
                for side, entries in (("in", g.inputs), ("out", g.outputs)):
                    for name, _, root in entries:
                        key = (name, side)
                        start = expected.get(key, channels(modules[name], side))
                        expected[key] = start - sum(r in dropped for r in root)
                root_module, handler = handlers[i]
                graph.get_pruning_group(root_module, handler, sorted(dropped)).prune(record_history=False)
            if any(channels(modules[name], side) != n for (name, side), n in expected.items()):
                return False
            return failing_module(model, example) is None
        except Exception:  # noqa: BLE001 - torch-pruning raising is one more way a group is not removable
            return False
        finally:
            backup.restore()

    with torch.no_grad():
        if not groups or trial(list(range(len(groups)))):
            return groups, handlers, []
        good = [i for i in range(len(groups)) if trial([i])]
    dropped_roots = [g.root for i, g in enumerate(groups) if i not in set(good)]
    return [groups[i] for i in good], [handlers[i] for i in good], dropped_roots
