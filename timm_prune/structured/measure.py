"""What a structured method measures: a FLOPs count differentiable in the channel gates (exact for 0/1 gates),
FLOPs as torch counts them, CPU latency, parameters, and the refill that lands a selection on a FLOPs budget.

FLOPs convention: everywhere in timm_prune, "FLOPs" are what ``torch.utils.flop_counter.FlopCounterMode``
counts, i.e. 2 x multiply-accumulates of convolutions and matrix products (normalisation, activations and
element-wise ops are not counted).
"""

from __future__ import annotations

import statistics
from collections.abc import Callable, Iterable

import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

from .gates import GateMaps, with_constant
from .groups import channels, is_counted


class FlopsCounter:
    """FLOPs of a model as a function of its channel gates.

    Convs and linears are counted from their gated input / output channel counts and their output positions
    (one forward at the example size); what they do not explain (attention matmuls) is the constant ``rest``,
    constant because head dimensions are never pruned. ``dense``: the measured FLOPs of the unpruned model.
    """

    def __init__(self, model: nn.Module, maps: GateMaps, example: torch.Tensor) -> None:
        self.in_maps, self.out_maps = maps.in_maps, maps.out_maps
        self.total = maps.total
        modules = dict(model.named_modules())
        # Output positions of every conv / linear (per sample), from one forward at the example size.
        positions: dict[str, int] = {}
        hooks = []
        for name, module in model.named_modules():
            if is_counted(module):
                hooks.append(module.register_forward_hook(_position_hook(positions, name)))
        try:
            with torch.no_grad():
                model(example[:1])
        finally:
            for h in hooks:
                h.remove()
        self.positions = positions
        self.modules = {name: modules[name] for name in positions}
        dense = self.count(torch.ones(self.total, device=example.device)).item()
        self.reference_total = measure_flops(model, example[:1])
        self.rest = self.reference_total - dense
        self.dense = self.reference_total

    def count(self, gates: torch.Tensor) -> torch.Tensor:
        """FLOPs (2 x MACs) of all convs / linears with channels weighted by ``gates`` (binary gates: exact)."""
        flat = with_constant(gates)
        total = gates.new_zeros(())
        for name, module in self.modules.items():
            n_out = channels(module, "out")
            n_in = channels(module, "in")
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


def _position_hook(store: dict[str, int], name: str):
    def hook(module: nn.Module, args: tuple, output: torch.Tensor) -> None:
        # Run at batch 1, so every other dimension counts, including batch-like ones that models fold in
        # (MobileViT runs its transformer on (patch_area * batch, tokens, dim)).
        width = output.shape[1] if isinstance(module, nn.Conv2d) else output.shape[-1]
        store[name] = int(output.numel() // width)

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


def paired_latency(
    dense: nn.Module, pruned: nn.Module, example: torch.Tensor, runs: int = 10, threads: int = 1
) -> dict:
    """Batch-1 CPU latency of ``dense`` and ``pruned``, measured the way the field does (``torch.utils.benchmark``,
    a fixed thread count), interleaved: ``runs`` rounds each time both models (in alternating order), so that load
    from other processes hits both sides of each ratio alike. Returns the median milliseconds of each and the
    median, first and third quartile of the per-round speed-ups (dense / pruned)."""
    from torch.utils import benchmark

    x = example[:1].detach().cpu()
    timers = {
        name: benchmark.Timer(stmt="model(x)", globals={"model": model.cpu(), "x": x}, num_threads=threads)
        for name, model in (("dense", dense), ("pruned", pruned))
    }
    times: dict[str, list[float]] = {"dense": [], "pruned": []}
    with torch.inference_mode():
        for name in timers:  # warm-up (allocator, one-off kernel selection)
            timers[name].timeit(2)
        for i in range(runs):
            for name in ("dense", "pruned") if i % 2 == 0 else ("pruned", "dense"):
                times[name].append(1000 * timers[name].timeit(1).median)
    ratios = sorted(d / p for d, p in zip(times["dense"], times["pruned"], strict=True))
    quartiles = statistics.quantiles(ratios, n=4) if len(ratios) > 1 else [ratios[0]] * 3
    return {
        "dense_ms": statistics.median(times["dense"]),
        "pruned_ms": statistics.median(times["pruned"]),
        "speedup": statistics.median(ratios),
        "speedup_q1": quartiles[0],
        "speedup_q3": quartiles[2],
        "threads": threads,
        "rounds": runs,
    }


def count_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def refill(
    keep: torch.Tensor,
    candidates: Iterable[int],
    flops: Callable[[torch.Tensor], float],
    budget: float,
    tolerance: float = 0.005,
    max_tries: int = 512,
) -> torch.Tensor:
    """Give removed gates back, in ``candidates`` order, while the FLOPs stay within ``budget``.

    A selection moves in whole channels, and one channel of an early, wide layer can be worth a few percent of
    the FLOPs of a small model: this fills the gap until the FLOPs are within ``tolerance`` of the budget (or
    ``max_tries`` candidates were tried). ``keep`` (bool over all gates) is updated in place and returned.
    """
    current = flops(keep)
    for tried, i in enumerate(candidates):
        if current >= (1 - tolerance) * budget or tried >= max_tries:
            break
        keep[i] = True
        candidate = flops(keep)
        if candidate <= budget:
            current = candidate
        else:
            keep[i] = False
    return keep
