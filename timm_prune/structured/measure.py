"""Structured (channel) pruning machinery shared by structured methods: coupled channel groups from
torch-pruning's dependency graph, per-channel gates applied in the forward pass, a FLOPs count that is
differentiable in the gates and exact for binary gates, physical channel removal, and the record of
changed module attributes / tensor shapes that rebuilds the narrowed architecture on load.

FLOPs convention: everywhere in timm_prune, "FLOPs" are what ``torch.utils.flop_counter.FlopCounterMode``
counts, i.e. 2 x multiply-accumulates of convolutions and matrix products (normalisation, activations and
element-wise ops are not counted).
"""

from __future__ import annotations

import statistics
import time
import warnings
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .structured_guard import ModelBackup, all_groups, failing_module
from .structured_rules import FOLD, folded, folding_pruners, is_folding

# Module attributes whose values may change when channels are removed (and so must be recorded for rebuild).
_SIMPLE = (bool, int, float, str)


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


@dataclass
class StructuredReport:
    """What ``prune()`` did for a structured method: sizes, FLOPs and CPU latency before / after, per-group channels."""

    method: str
    flops_target: float  # as configured
    target_flops: float  # absolute, 2 x MACs per image
    input_size: list[int]
    params_before: int
    params_after: int
    flops_before: float
    flops_after: float
    latency_ms_before: float | None
    latency_ms_after: float | None
    threshold: float  # the global gate threshold (channels with a lower gate were removed)
    groups: list[dict[str, Any]] = field(default_factory=list)  # {"root", "channels", "kept"}
    planned_flops: float | None = None  # what selection computed; equals flops_after when the count is exact
    kind: str = "structured"

    @property
    def flops_ratio(self) -> float:
        return self.flops_after / self.flops_before

    @property
    def speedup(self) -> float | None:
        if not self.latency_ms_before or not self.latency_ms_after:
            return None
        return self.latency_ms_before / self.latency_ms_after

    def to_dict(self) -> dict[str, Any]:
        out = {k: getattr(self, k) for k in self.__dataclass_fields__}
        out["flops_ratio"] = self.flops_ratio
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> StructuredReport:
        return cls(**{k: data[k] for k in cls.__dataclass_fields__ if k in data})

    def __str__(self) -> str:
        def lat(v: float | None) -> str:
            return "n/a" if v is None else f"{v:.2f} ms"

        lines = [
            f"{self.method}: structured, FLOPs target {self.target_flops / 1e6:.2f} MFLOPs at {self.input_size}",
            f"  params  {self.params_before:,} -> {self.params_after:,} ({self.params_after / self.params_before:.1%})",
            f"  FLOPs   {self.flops_before / 1e6:.2f} -> {self.flops_after / 1e6:.2f} M ({self.flops_ratio:.1%}; "
            "2 x MACs, FlopCounterMode)",
            f"  latency {lat(self.latency_ms_before)} -> {lat(self.latency_ms_after)} (CPU, batch 1, median)",
            f"  gate threshold {self.threshold:.4f}; {len(self.groups)} channel groups:",
        ]
        width = max((len(g["root"]) for g in self.groups), default=0)
        lines += [f"    {g['root']:<{width}}  {g['kept']:>5} / {g['channels']}" for g in self.groups]
        return "\n".join(lines)


def _is_counted(module: nn.Module) -> bool:
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
                    inner.update(m for m in child.modules() if _is_counted(m))
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
    keep_fixed = [m for m in model.modules() if _is_counted(m) and m not in set(prunable.values())]
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
            if not isinstance(module, nn.Module) or not _is_counted(module) or module not in names:
                continue
            entry = (names[module], local, root)
            if max(entry[1]) >= _channels(module, side) or max(entry[2]) >= size:
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
                        start = expected.get(key, _channels(modules[name], side))
                        expected[key] = start - sum(r in dropped for r in root)
                root_module, handler = handlers[i]
                graph.get_pruning_group(root_module, handler, sorted(dropped)).prune(record_history=False)
            if any(_channels(modules[name], side) != n for (name, side), n in expected.items()):
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


class GatedCounter:
    """Gates per group channel (one flat vector, one extra constant 1 at the end for ungated channels) applied
    to the inputs of consuming layers, and a FLOPs count that is a differentiable function of the gates.

    Gating the *inputs* of the layers that consume a channel is what removing it does to them, exactly for
    convs and linears (a channel that enters only through them disappears when its gate is 0).
    """

    def __init__(self, model: nn.Module, groups: list[ChannelGroup], example: torch.Tensor) -> None:
        self.model = model
        self.groups = groups
        self.offsets = []
        total = 0
        for g in groups:
            self.offsets.append(total)
            total += g.num_gates
        self.total = total
        self.gates: torch.Tensor | None = None  # set by the trainer; None = no gating
        modules = dict(model.named_modules())
        in_maps: dict[str, torch.Tensor] = {}
        out_maps: dict[str, torch.Tensor] = {}
        for g, off in zip(groups, self.offsets, strict=True):
            for entries, maps, attr in ((g.inputs, in_maps, "in"), (g.outputs, out_maps, "out")):
                for name, local, root in entries:
                    module = modules[name]
                    n = _channels(module, attr)
                    m = maps.setdefault(name, torch.full((n,), total, dtype=torch.long))
                    m[torch.tensor(local)] = torch.tensor(root) % g.num_gates + off
        self.in_maps, self.out_maps = in_maps, out_maps
        # Output positions of every conv / linear (per sample), from one forward at the example size.
        positions: dict[str, int] = {}
        hooks = []
        for name, module in model.named_modules():
            if _is_counted(module):
                hooks.append(module.register_forward_hook(_position_hook(positions, name)))
        try:
            with torch.no_grad():
                model(example[:1])
        finally:
            for h in hooks:
                h.remove()
        self.positions = positions
        self.modules = {name: modules[name] for name in positions}
        dense = self.count(torch.ones(total, device=example.device)).item()
        self.reference_total = measure_flops(model, example[:1])
        # What convs/linears do not explain (attention matmuls); constant because head dims are never pruned.
        self.rest = self.reference_total - dense
        self.dense = self.reference_total
        self._handles: list[Any] = []

    def attach(self) -> None:
        modules = dict(self.model.named_modules())
        for name, index in self.in_maps.items():
            self._handles.append(modules[name].register_forward_pre_hook(self._gate_hook(index)))

    def detach(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []

    def _gate_hook(self, index: torch.Tensor):
        def hook(module: nn.Module, args: tuple) -> tuple | None:
            if self.gates is None:
                return None
            x = args[0]
            flat = torch.cat([self.gates, self.gates.new_ones(1)])
            scale = flat[index.to(flat.device)].to(x.dtype)
            if isinstance(module, nn.Conv2d):
                scale = scale.view(1, -1, 1, 1)
            return (x * scale,) + tuple(args[1:])

        return hook

    def count(self, gates: torch.Tensor) -> torch.Tensor:
        """FLOPs (2 x MACs) of all convs / linears with channels weighted by ``gates`` (binary gates: exact)."""
        flat = torch.cat([gates, gates.new_ones(1)])
        total = gates.new_zeros(())
        for name, module in self.modules.items():
            n_out = _channels(module, "out")
            n_in = _channels(module, "in")
            out = flat[self.out_maps[name].to(flat.device)].sum() if name in self.out_maps else gates.new_tensor(n_out)
            inp = flat[self.in_maps[name].to(flat.device)].sum() if name in self.in_maps else gates.new_tensor(n_in)
            if isinstance(module, nn.Conv2d):
                kk = module.kernel_size[0] * module.kernel_size[1]
                if module.groups > 1 and module.groups == n_in:
                    per_out = gates.new_tensor(n_in / module.groups)  # depthwise: one input per output channel
                else:
                    per_out = inp / module.groups
                total = total + 2 * self.positions[name] * kk * out * per_out
            else:
                total = total + 2 * self.positions[name] * out * inp
        return total

    def keep_flops(self, keep: torch.Tensor) -> float:
        """Exact FLOPs of the model with only the ``keep`` channels (bool over all groups) left."""
        return float(self.count(keep.to(torch.float64))) + self.rest


def _channels(module: nn.Module, side: str) -> int:
    if isinstance(module, nn.Linear):
        return module.in_features if side == "in" else module.out_features
    return module.in_channels if side == "in" else module.out_channels


def _position_hook(store: dict[str, int], name: str):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # Run at batch 1, so every other dimension counts, including batch-like ones that models fold in
        # (MobileViT runs its transformer on (patch_area * batch, tokens, dim)).
        channels = output.shape[1] if isinstance(module, nn.Conv2d) else output.shape[-1]
        store[name] = int(output.numel() // channels)

    return hook


def measure_flops(model: nn.Module, example: torch.Tensor) -> float:
    """FLOPs of one forward at ``example``'s shape (per sample), as ``FlopCounterMode`` counts them.

    timm attention modules run the explicit ``q @ k^T`` / ``attn @ v`` path while counting: FlopCounterMode
    does not count torch's fused CPU attention kernel, which would drop the attention matmuls from the figure.
    """
    fused = [(m, m.fused_attn) for m in model.modules() if isinstance(getattr(m, "fused_attn", None), bool)]
    # FlopCounterMode's module tracker hooks every tensor that requires grad; a view of a parameter made under
    # no_grad (PiT's expanded cls_token) requires grad without a grad_fn and breaks it: count with frozen params.
    frozen = [(p, p.requires_grad) for p in model.parameters()]
    counter = FlopCounterMode(display=False)
    try:
        for m, _ in fused:
            m.fused_attn = False
        for p, _ in frozen:
            p.requires_grad_(False)
        with torch.no_grad(), counter:
            model(example[:1])
    finally:
        for m, flag in fused:
            m.fused_attn = flag
        for p, flag in frozen:
            p.requires_grad_(flag)
    return float(counter.get_total_flops())


def measure_latency(model: nn.Module, example: torch.Tensor, runs: int = 10) -> float:
    """Median CPU latency in milliseconds of one forward at batch 1 (after two warm-up runs)."""
    x = example[:1].detach().cpu()
    model = model.cpu() if next(model.parameters()).device.type != "cpu" else model
    times = []
    with torch.inference_mode():
        for i in range(runs + 2):
            start = time.perf_counter()
            model(x)
            if i >= 2:
                times.append(1000 * (time.perf_counter() - start))
    return statistics.median(times)


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


# ------------------------------------------------------------------------------------------------ rebuild record
def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes of every module (what a channel removal may change), for ``structure_diff``."""
    out = {}
    for name, module in model.named_modules():
        attrs = {}
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, _SIMPLE) or (
                isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value)
            ):
                attrs[key] = list(value) if isinstance(value, tuple) else value
        out[name] = attrs
    return out


def structure_diff(before: dict[str, dict[str, Any]], model: nn.Module) -> dict[str, Any]:
    """JSON-able record of what changed: ``{"modules": {name: {attr: value}}, "tensors": {key: shape}}``.

    Applied to a freshly built model by ``apply_structure``; tensor shapes are recorded for every parameter
    and buffer so that the load is checked with ``load_state_dict(strict=True)``.
    """
    after = snapshot(model)
    modules = {}
    for name, attrs in after.items():
        changed = {k: v for k, v in attrs.items() if before.get(name, {}).get(k, object()) != v}
        if changed:
            modules[name] = changed
    tensors = {key: list(value.shape) for key, value in model.state_dict().items()}
    return {"modules": modules, "tensors": tensors}


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Narrow a freshly built ``model`` in place to the recorded structure (attributes, then tensor shapes)."""
    for name, attrs in structure.get("modules", {}).items():
        module = model.get_submodule(name) if name else model
        for key, value in attrs.items():
            old = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value)
    state = model.state_dict(keep_vars=True)
    for key, shape in structure.get("tensors", {}).items():
        if key not in state:
            raise ValueError(f"structure record names {key!r}, which {type(model).__name__} does not have")
        tensor = state[key]
        if list(tensor.shape) == list(shape):
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        new = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            owner._buffers[attr] = new
    return model
