"""Calibration: statistics of each targeted layer's INPUT, gathered with forward pre-hooks.

A layer computes ``y = W x`` on "input columns" ``x``:

- Linear: every row of the input flattened over its leading dims (tokens of a ViT, samples of an MLP);
  columns = ``in_features``.
- Conv2d: every receptive-field patch of the input, i.e. ``F.unfold`` with the layer's own kernel size,
  stride and dilation, after the layer's own padding (``padding_mode`` zeros / reflect / replicate /
  circular, integer or ``'same'`` / ``'valid'`` padding, and timm's dynamic TF-style "same" padding of
  ``Conv2dSame`` / ``Conv2dSameExport`` / ``StdConv2dSame`` computed as ``timm.layers.padding.pad_same``
  does). A conv with ``g`` groups is ``g`` independent products, so its columns come per group, each of
  size ``in_channels / g * kh * kw`` in the order of ``weight[o].reshape(-1)`` (channel, kh, kw).

``input_columns`` returns them as a ``(groups, rows, columns)`` tensor; Linear has one group. Statistics
accumulate from those columns, a chunk of samples at a time so that the unfolded input is never held whole:
``FeatureNorms`` (per-column squared norms, for Wanda) and ``InputHessian`` (``X X^T`` per group, for
SparseGPT).

Two drivers run the calibration batches through the model:

- ``capture_all``: all layers hooked at once, one pass (Wanda: per-feature norms are small).
- ``capture_sequential``: SparseGPT's sequential mode (Frantar & Alistarh 2023, arXiv 2301.00774, also used by
  Wanda, Sun et al. 2023, arXiv 2306.11695): layers in forward order, one at a time, each measured on the inputs
  that the already pruned layers before it produce. Two ways to run it, with the same result:

  - ``one_pass=True`` (default): the calibration batches are joined into one batch and run through the model
    once, every layer hooked; a layer's pre-hook gathers its statistics from the whole calibration set and calls
    ``on_layer``, which prunes the layer in place before the layer itself runs, so every later layer sees the
    pruned model's activations. Cost: one forward; memory: the activations of all calibration images at once
    (what the paper's implementation holds per block) plus one layer's statistics.
  - ``one_pass=False``: for layer i a pre-hook on that layer only, the batches run through the model one at a
    time, the hook is removed, ``on_layer`` prunes the layer, then layer i + 1. Memory: one batch's activations
    and one layer's statistics; cost: up to one calibration pass per layer (a pass stops at the hooked layer).

  A layer that runs more than once per forward (a shared module) needs all of its calls' inputs before it can be
  pruned; it is measured the second way, after the one pass. Batches that cannot be joined (different
  structures, or non-tensor leaves) fall back to the second way, with a warning.

Every hook is removed in a ``finally`` (also when a batch raises), and the model's train/eval flags are
restored: calibration runs in eval mode under ``torch.no_grad`` so that BatchNorm statistics do not move.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.padding import get_same_padding

# Largest unfolded chunk (elements) built at once inside a hook: 16M floats = 64 MB in float32.
MAX_CHUNK_ELEMENTS = 1 << 24


# --------------------------------------------------------------------------------------------------------------
# Input columns
# --------------------------------------------------------------------------------------------------------------


def _pair(v: Any) -> tuple[int, int]:
    return (int(v), int(v)) if isinstance(v, int) else (int(v[0]), int(v[1]))


def _dynamic_same(module: nn.Conv2d) -> bool:
    """timm convs that pad TF-"same" style inside forward, from the input size."""
    return isinstance(module, (Conv2dSame, Conv2dSameExport)) or bool(getattr(module, "same_pad", False))


def conv_padding(module: nn.Conv2d, input_hw: tuple[int, int]) -> tuple[int, int, int, int]:
    """``(left, right, top, bottom)`` padding the conv applies to an input of spatial size ``input_hw``."""
    kh, kw = _pair(module.kernel_size)
    sh, sw = _pair(module.stride)
    dh, dw = _pair(module.dilation)
    if _dynamic_same(module):
        pad_h = get_same_padding(input_hw[0], kh, sh, dh)
        pad_w = get_same_padding(input_hw[1], kw, sw, dw)
        return pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2
    padding = module.padding
    if isinstance(padding, str):
        if padding == "valid":
            return 0, 0, 0, 0
        if padding == "same":  # torch's 'same' (stride 1): total d*(k-1), the extra one on the right/bottom
            total_h, total_w = dh * (kh - 1), dw * (kw - 1)
            return total_w // 2, total_w - total_w // 2, total_h // 2, total_h - total_h // 2
        raise ValueError(f"unsupported conv padding {padding!r}")
    ph, pw = _pair(padding)
    return pw, pw, ph, ph


def conv_columns(module: nn.Conv2d, x: torch.Tensor) -> torch.Tensor:
    """Unfolded input patches of a Conv2d, ``(groups, N * L, in_channels / groups * kh * kw)``.

    ``cols[g] @ weight[group g rows].reshape(rows, -1).T`` equals the conv's output (bias aside) for group g.
    """
    if x.dim() == 3:  # unbatched input
        x = x.unsqueeze(0)
    left, right, top, bottom = conv_padding(module, (x.shape[-2], x.shape[-1]))
    unfold_padding: tuple[int, int] = (0, 0)
    if left == right and top == bottom and module.padding_mode == "zeros":
        unfold_padding = (top, left)  # unfold pads with zeros itself: no padded copy
    elif left or right or top or bottom:
        mode = "constant" if module.padding_mode == "zeros" else module.padding_mode
        x = F.pad(x, (left, right, top, bottom), mode=mode)
    kernel, dilation, stride = _pair(module.kernel_size), _pair(module.dilation), _pair(module.stride)
    # (N, C * kh * kw, L), channel-major like weight[o].reshape(-1)
    patches = F.unfold(x, kernel, dilation=dilation, padding=unfold_padding, stride=stride)
    n, features, positions = patches.shape
    groups = module.groups
    per_group = features // groups
    patches = patches.reshape(n, groups, per_group, positions).permute(1, 0, 3, 2)
    return patches.reshape(groups, n * positions, per_group)


def input_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's input as columns ``(groups, rows, columns)`` (module docstring); Linear has one group."""
    if isinstance(module, nn.Conv2d):
        return conv_columns(module, x)
    if isinstance(module, nn.Linear):
        return x.reshape(1, -1, x.shape[-1])
    raise TypeError(f"input columns are defined for Conv2d and Linear, not {type(module).__name__}")


def layer_groups(module: nn.Module) -> tuple[int, int]:
    """``(groups, columns per group)`` of the layer's input columns."""
    if isinstance(module, nn.Conv2d):
        kh, kw = _pair(module.kernel_size)
        return module.groups, module.in_channels // module.groups * kh * kw
    if isinstance(module, nn.Linear):
        return 1, module.in_features
    raise TypeError(f"input columns are defined for Conv2d and Linear, not {type(module).__name__}")


def conv_output_size(module: nn.Conv2d, input_hw: tuple[int, int]) -> tuple[int, int]:
    """Output spatial size of the conv on an input of spatial size ``input_hw`` (after its own padding)."""
    left, right, top, bottom = conv_padding(module, input_hw)
    (kh, kw), (sh, sw), (dh, dw) = _pair(module.kernel_size), _pair(module.stride), _pair(module.dilation)
    h = (input_hw[0] + top + bottom - dh * (kh - 1) - 1) // sh + 1
    w = (input_hw[1] + left + right - dw * (kw - 1) - 1) // sw + 1
    return h, w


def iter_input_columns(module: nn.Module, x: torch.Tensor, max_elements: int | None = None):
    """``input_columns`` a chunk at a time, each chunk at most about ``max_elements`` elements (default
    ``MAX_CHUNK_ELEMENTS``; one sample of a conv, one row of a linear, at least)."""
    max_elements = MAX_CHUNK_ELEMENTS if max_elements is None else max_elements
    groups, columns = layer_groups(module)
    if isinstance(module, nn.Linear):
        rows = x.reshape(-1, x.shape[-1])
        step = max(1, max_elements // max(columns, 1))
        for start in range(0, rows.shape[0], step):
            yield rows[start : start + step].unsqueeze(0)
        return
    if x.dim() == 3:
        x = x.unsqueeze(0)
    oh, ow = conv_output_size(module, (x.shape[-2], x.shape[-1]))
    step = max(1, max_elements // max(oh * ow * groups * columns, 1))
    for start in range(0, x.shape[0], step):
        yield conv_columns(module, x[start : start + step])


# --------------------------------------------------------------------------------------------------------------
# Statistics
# --------------------------------------------------------------------------------------------------------------


class InputStatistics:
    """Running statistics of a layer's input columns; subclasses define what is accumulated."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        self.groups, self.columns = layer_groups(module)
        self.module_type = type(module).__name__
        self.dtype = dtype
        self.rows = 0

    def add(self, module: nn.Module, x: torch.Tensor) -> None:
        for cols in iter_input_columns(module, x.detach()):
            cols = cols.to(self.dtype)
            self.rows += cols.shape[1]
            self._accumulate(cols)

    def _accumulate(self, cols: torch.Tensor) -> None:  # (groups, rows, columns)
        raise NotImplementedError


class FeatureNorms(InputStatistics):
    """Per input column j: ``sum_rows x_j^2`` over the calibration set (Wanda's ``||X_j||_2^2``)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(module, dtype)
        self.squared_sum: torch.Tensor | None = None

    def _accumulate(self, cols: torch.Tensor) -> None:
        s = cols.square().sum(1)
        self.squared_sum = s if self.squared_sum is None else self.squared_sum + s

    def norms(self) -> torch.Tensor:
        """Root mean square of each column over all rows, ``||X_j||_2 / sqrt(rows)``, shaped ``(groups, columns)``.

        Within a layer this ranks exactly like ``||X_j||_2``; dividing by ``sqrt(rows)`` makes layers with
        different numbers of positions per image comparable under a global threshold.
        """
        if self.squared_sum is None or self.rows == 0:
            raise RuntimeError("FeatureNorms.norms(): no calibration input reached this layer")
        return (self.squared_sum / self.rows).sqrt()


class InputHessian(InputStatistics):
    """Per group: ``X X^T`` over the calibration set; ``hessian() = 2 X X^T / rows`` (the layer-wise
    reconstruction loss ``||W X - W' X||^2 / rows`` has this Hessian in each row of ``W'``)."""

    def __init__(self, module: nn.Module, dtype: torch.dtype = torch.float32) -> None:
        super().__init__(module, dtype)
        self.xtx: torch.Tensor | None = None

    def _accumulate(self, cols: torch.Tensor) -> None:
        gram = cols.transpose(1, 2) @ cols
        self.xtx = gram if self.xtx is None else self.xtx + gram

    def hessian(self) -> torch.Tensor:
        """``2 X X^T / rows``, shaped ``(groups, columns, columns)``."""
        if self.xtx is None or self.rows == 0:
            raise RuntimeError("InputHessian.hessian(): no calibration input reached this layer")
        return self.xtx * (2.0 / self.rows)


# --------------------------------------------------------------------------------------------------------------
# Drivers
# --------------------------------------------------------------------------------------------------------------

StatsFactory = Callable[[str, nn.Module], InputStatistics]
ForwardFn = Callable[[nn.Module, Any], Any]


class _LayerReached(Exception):
    """Raised by a sequential hook to end the forward pass once the hooked layer has its input."""


def _device(model: nn.Module) -> torch.device | None:
    for p in model.parameters():
        return p.device
    for b in model.buffers():
        return b.device
    return None


def default_forward(model: nn.Module, batch: Any) -> Any:
    """``model(images)`` for a tensor batch or an ``(images, labels, ...)`` tuple/list; images moved to the
    model's device."""
    if isinstance(batch, (tuple, list)):
        if not batch:
            raise TypeError("empty calibration batch")
        batch = batch[0]
    if isinstance(batch, Mapping):
        for key in ("pixel_values", "image", "images", "input", "x"):
            if key in batch:
                batch = batch[key]
                break
        else:
            raise TypeError(f"calibration batch is a mapping without an image key ({sorted(batch)}); pass forward=")
    if not isinstance(batch, torch.Tensor):
        raise TypeError(f"calibration batch of type {type(batch).__name__}: pass a tensor, a tuple, or forward=")
    device = _device(model)
    return model(batch.to(device) if device is not None else batch)


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return args[0]
    if "input" in kwargs:
        return kwargs["input"]
    return next(iter(kwargs.values()))


class _EvalNoGrad:
    """eval() and no_grad for the duration; restores every module's own ``training`` flag."""

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.flags: list[tuple[nn.Module, bool]] = []

    def __enter__(self) -> _EvalNoGrad:
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()
        self.grad = torch.no_grad()
        self.grad.__enter__()
        return self

    def __exit__(self, *exc: Any) -> None:
        self.grad.__exit__(*exc)
        for module, flag in self.flags:
            module.training = flag


def _materialise(batches: Iterable[Any]) -> list[Any]:
    batches = list(batches)
    if not batches:
        raise ValueError("calibration needs at least one batch; got none")
    return batches


def forward_order(
    model: nn.Module, layers: Mapping[str, nn.Module], batch: Any, forward: ForwardFn | None = None
) -> tuple[list[str], dict[str, int]]:
    """Names of ``layers`` in the order they first run on ``batch``, and how many times each runs per forward.

    Layers that never run are absent from the order and have count 0.
    """
    forward = forward or default_forward
    order: list[str] = []
    calls = dict.fromkeys(layers, 0)
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if calls[name] == 0:
                order.append(name)
            calls[name] += 1

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        with _EvalNoGrad(model):
            forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return order, calls


def capture_all(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    stats_factory: StatsFactory = lambda name, module: FeatureNorms(module),
    forward: ForwardFn | None = None,
) -> dict[str, InputStatistics]:
    """One pass over ``batches`` with every layer hooked; returns each layer's statistics (non-sequential mode).

    Layers that never run are left out of the result.
    """
    forward = forward or default_forward
    stats: dict[str, InputStatistics] = {}
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            if name not in stats:
                stats[name] = stats_factory(name, module)
            stats[name].add(module, _input_of(args, kwargs))

        return hook

    try:
        for name, module in layers.items():
            handles.append(module.register_forward_pre_hook(make_hook(name), with_kwargs=True))
        with _EvalNoGrad(model):
            for batch in batches:
                forward(model, batch)
    finally:
        for handle in handles:
            handle.remove()
    return {name: stats[name] for name in layers if name in stats}


@dataclass
class SequentialRun:
    """What ``capture_sequential`` did: layers processed in forward order, and targeted layers that never ran."""

    order: list[str] = field(default_factory=list)
    unreached: list[str] = field(default_factory=list)
    passes: int = 0


def join_batches(batches: list[Any]) -> Any:
    """One batch made of ``batches`` concatenated along dim 0: tensors, and tuples / lists / mappings of tensors of
    the same structure. Raises ``TypeError`` for anything else."""
    first = batches[0]
    if isinstance(first, torch.Tensor):
        if first.dim() == 0 or not all(isinstance(b, torch.Tensor) and b.shape[1:] == first.shape[1:] for b in batches):
            raise TypeError("calibration batches of different types or shapes, or 0-d tensors, cannot be joined")
        return torch.cat(batches)
    if isinstance(first, (tuple, list)):
        if not all(isinstance(b, type(first)) and len(b) == len(first) for b in batches):
            raise TypeError("calibration batches of different structures cannot be joined")
        return type(first)(join_batches([b[i] for b in batches]) for i in range(len(first)))
    if isinstance(first, Mapping):
        if not all(isinstance(b, Mapping) and b.keys() == first.keys() for b in batches):
            raise TypeError("calibration batches with different keys cannot be joined")
        return {k: join_batches([b[k] for b in batches]) for k in first}
    raise TypeError(f"calibration batches holding {type(first).__name__} cannot be joined")


def capture_sequential(
    model: nn.Module,
    layers: Mapping[str, nn.Module],
    batches: Iterable[Any],
    on_layer: Callable[[str, nn.Module, InputStatistics], None],
    stats_factory: StatsFactory = lambda name, module: InputHessian(module),
    forward: ForwardFn | None = None,
    stop_early: bool = True,
    one_pass: bool = True,
) -> SequentialRun:
    """SparseGPT's sequential mode on an arbitrary graph (module docstring).

    Every layer, in forward order (found on the first batch), gets ``on_layer(name, module, stats)`` with the
    statistics of its input over all ``batches``, taken after the layers before it were passed to ``on_layer``
    (which is expected to prune the layer in place). ``one_pass`` joins the batches and does it in one forward;
    without it, each layer is hooked alone and every batch replayed (``batches`` is read once into a list), and
    with ``stop_early`` such a pass ends as soon as the hooked layer has its input, for layers that run once per
    forward. Targeted layers that never run are not passed to ``on_layer``; they are listed in ``unreached``.
    """
    forward = forward or default_forward
    batches = _materialise(batches)
    order, calls = forward_order(model, layers, batches[0], forward)
    run = SequentialRun(order=[], unreached=[n for n in layers if calls[n] == 0])
    if run.unreached:
        warnings.warn(
            f"{len(run.unreached)} targeted layer(s) never ran on the calibration batch and get no statistics: "
            f"{', '.join(run.unreached[:8])}{' ...' if len(run.unreached) > 8 else ''}",
            stacklevel=2,
        )
    remaining = order
    if one_pass:
        try:
            joined = join_batches(batches)
        except TypeError as e:
            warnings.warn(f"{e}; measuring one layer per pass instead (one_pass=False)", stacklevel=2)
        else:
            _one_pass(model, layers, [n for n in order if calls[n] == 1], joined, on_layer, stats_factory, forward, run)
            remaining = [n for n in order if calls[n] > 1]
    _pass_per_layer(model, layers, remaining, batches, on_layer, stats_factory, forward, stop_early, calls, run)
    return run


def _one_pass(model, layers, names, joined, on_layer, stats_factory, forward, run: SequentialRun) -> None:
    """Every layer of ``names`` measured and passed to ``on_layer`` inside its own pre-hook, in one forward."""
    handles = []

    def make_hook(name: str):
        def hook(module: nn.Module, args: tuple, kwargs: dict) -> None:
            stats = stats_factory(name, module)
            stats.add(module, _input_of(args, kwargs))
            on_layer(name, module, stats)  # prunes before the layer runs: later layers see its pruned output
            run.order.append(name)

        return hook

    try:
        for name in names:
            handles.append(layers[name].register_forward_pre_hook(make_hook(name), with_kwargs=True))
        with _EvalNoGrad(model):
            run.passes += 1
            forward(model, joined)
    finally:
        for handle in handles:
            handle.remove()


def _pass_per_layer(model, layers, names, batches, on_layer, stats_factory, forward, stop_early, calls, run) -> None:
    """Each layer of ``names`` hooked alone, every batch replayed up to it, then passed to ``on_layer``."""
    for name in names:
        module = layers[name]
        stats = stats_factory(name, module)
        stop = stop_early and calls[name] == 1

        def hook(module: nn.Module, args: tuple, kwargs: dict, stats: InputStatistics = stats, stop: bool = stop):
            stats.add(module, _input_of(args, kwargs))
            if stop:
                raise _LayerReached

        handle = module.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            with _EvalNoGrad(model):
                for batch in batches:
                    run.passes += 1
                    try:
                        forward(model, batch)
                    except _LayerReached:
                        pass
        finally:
            handle.remove()
        on_layer(name, module, stats)
        run.order.append(name)


__all__ = [
    "MAX_CHUNK_ELEMENTS",
    "FeatureNorms",
    "InputHessian",
    "InputStatistics",
    "SequentialRun",
    "capture_all",
    "capture_sequential",
    "conv_columns",
    "conv_output_size",
    "conv_padding",
    "default_forward",
    "forward_order",
    "input_columns",
    "iter_input_columns",
    "join_batches",
    "layer_groups",
]
