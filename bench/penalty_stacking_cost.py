"""POF's penalty (forward and backward) computed layer by layer against stacked by fan-in, interleaved in one
process, on the weights of a few timm models.

``pm.penalty()`` stacks the layers whose units share a fan-in (``timm_prune/methods/pof_penalty.py``); the
layer-by-layer form below is the one it replaced (the same values and gradients; the stacks are cut at 1 M entries
on a CPU). Each round times both on the same
weights and candidates, in alternating order; the figure is the median of the per-round ratios, with the kernels
each form dispatches (``bench/pof_step_ops.py`` counts whole steps).

    OMP_NUM_THREADS=1 python bench/penalty_stacking_cost.py               # CPU, one thread
    python bench/penalty_stacking_cost.py --device cuda --results bench/results/gpu

Writes <results>/penalty_stacking_cost.{json,md}.
"""

from __future__ import annotations

import argparse
import functools
import statistics
import time
from pathlib import Path

import timm
import torch
from _cifar10_v2_report import write_figures
from _recipe_runner import ROOT
from pof_step_ops import NO_KERNEL, _OperatorCount

import timm_prune
from timm_prune.methods import pof_penalty

MODELS = {
    "resnet18 (half width)": ("resnet18", {"channels": [32, 64, 128, 256], "stem_width": 32}),
    "convnext_atto": ("convnext_atto", {}),
    "vit_tiny_patch16_224 (32 px)": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}),
    "resnet50": ("resnet50", {}),
}


class _LayerEnergy(torch.autograd.Function):
    """One layer's per-unit candidate energy shares with the gradient written out: the form ``pm.penalty()`` ran,
    once per layer, before the stacking (timm_prune 3a6d823)."""

    @staticmethod
    def forward(ctx, v: torch.Tensor, candidates: torch.Tensor) -> torch.Tensor:
        candidates = candidates.to(v.dtype)
        v2 = v.square()
        energy = v2.sum(1).clamp_min(1e-24)
        share = (v2 * candidates).sum(1) / energy
        ctx.save_for_backward(v, candidates, share, energy)
        return share

    @staticmethod
    def backward(ctx, grad_share: torch.Tensor) -> tuple[torch.Tensor, None]:
        v, candidates, share, energy = ctx.saved_tensors
        per_unit = (2 * grad_share / energy).unsqueeze(1)
        return torch.addcmul(-(share.unsqueeze(1) * per_unit), candidates, per_unit).mul_(v), None


def _layer_by_layer(pm: timm_prune.PrunedModel) -> torch.Tensor:
    shares = []
    for name, counts in pm.pruner.candidate_counts().items():
        v = pm.pruner.direction(name).float()
        units = v.shape[0]
        shares.append(_LayerEnergy.apply(v.reshape(units, -1), counts.reshape(units, -1)).mean())
    return pm.pruner.config.penalty_weight / len(pm.pruner.penalty_sparsities) * torch.stack(shares).mean()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--device", default="cpu")
    p.add_argument("--cpu_stack_entries", type=int, default=None, help="override pof_penalty.CPU_STACK_ENTRIES")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    args = p.parse_args()
    torch.set_num_threads(1)
    if args.cpu_stack_entries is not None:
        pof_penalty.CPU_STACK_ENTRIES = args.cpu_stack_entries
    device = torch.device(args.device)
    synchronize = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    rows = []
    for label in args.models:
        name, kwargs = MODELS[label]
        torch.manual_seed(0)
        # Candidates selected on the first call and never again: the penalty is timed, not a refresh.
        config = timm_prune.PruneConfig(
            method="pof", penalty_sparsities=[0.5, 0.7, 0.9, 0.95], penalty_weight=30.0, threshold_refresh=10**9
        )
        pm = timm_prune.convert(timm.create_model(name, num_classes=10, **kwargs), config).to(device)
        pm.penalty()  # selects the candidates
        forms = {"layer by layer": functools.partial(_layer_by_layer, pm), "stacked": pm.penalty}
        check = {form: f().item() for form, f in forms.items()}
        kernels = {}
        for form, f in forms.items():
            counter = _OperatorCount()
            with counter:
                f().backward()
            kernels[form] = sum(n for op, n in counter.counts.items() if op not in NO_KERNEL)
        times: dict[str, list[float]] = {form: [] for form in forms}
        for round_ in range(args.rounds + 3):
            for form in forms if round_ % 2 == 0 else reversed(list(forms)):
                synchronize()
                start = time.perf_counter()
                forms[form]().backward()
                synchronize()
                if round_ >= 3:
                    times[form].append(time.perf_counter() - start)
                pm.zero_grad(set_to_none=True)
        ratios = [s / layer for layer, s in zip(times["layer by layer"], times["stacked"], strict=True)]
        row = {
            "model": label,
            "layers": len(pm.targets),
            "stacks": len(pm.pruner.penalty_stacks()),
            "kernels": kernels,
            "median_ms": {form: 1e3 * statistics.median(t) for form, t in times.items()},
            "median_ratio": statistics.median(ratios),
            "values": check,
        }
        rows.append(row)
        print(row, flush=True)
    where = "one CPU thread" if device.type == "cpu" else torch.cuda.get_device_name(device)
    lines = [
        "# POF penalty: layer by layer vs stacked by fan-in",
        "",
        f"Forward and backward, {where}, fp32, torch {torch.__version__}; median of {args.rounds} interleaved rounds; "
        f"stacks on a CPU of at most {pof_penalty.CPU_STACK_ENTRIES:,} entries.",
        "",
        "| model | layers | stacks | kernels (by layer / stacked) | ms by layer | ms stacked | stacked / by layer |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        k, ms = row["kernels"], row["median_ms"]
        lines.append(
            f"| {row['model']} | {row['layers']} | {row['stacks']} | {k['layer by layer']} / {k['stacked']} | "
            f"{ms['layer by layer']:.2f} | {ms['stacked']:.2f} | x{row['median_ratio']:.2f} |"
        )
    payload = {"device": str(device), "device_name": where, "torch": torch.__version__, "rows": rows}
    payload["cpu_stack_entries"] = pof_penalty.CPU_STACK_ENTRIES
    write_figures(Path(args.results), "penalty_stacking_cost", payload, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
