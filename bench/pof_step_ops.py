"""How many operators a POF training step dispatches against a plain one: the launch count that decides a small
model's step time on a GPU, measured on any machine.

On a GPU a small model's step is bound by kernel launches, not arithmetic (benchmark v2's half-width ResNet-18 runs
11 ms steps on an H200), so what POF adds per targeted layer costs there what it does not on a CPU. Every operator
reaching the dispatcher below autograd is counted (``TorchDispatchMode``), split into those that run a kernel and
those that only make a view or read a scalar back (from a GPU tensor, a wait for the device; the
pruned-forward draw reads two from a CPU generator). The optimizer runs its multi-tensor
(``foreach``) path and the penalty stacks its layers, as both do on a GPU. Counts are per training step: the
median, the mean (with the steps that re-select the candidates, one in ``threshold_refresh``) and the largest.

    OMP_NUM_THREADS=1 python bench/pof_step_ops.py     # the ResNet recipe on benchmark v2's half-width ResNet-18

Writes bench/results/pof_step_ops.{json,md}.
"""

from __future__ import annotations

import argparse
import json
import statistics
from collections import Counter
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _cifar10_v2_report import write_figures
from _recipe_runner import ROOT, recipe_prune_config
from timm.optim import create_optimizer_v2
from torch.utils._python_dispatch import TorchDispatchMode

import timm_prune
from timm_prune.methods import pof_penalty

# Operators that run no kernel: views, metadata, allocation, profiler marks.
NO_KERNEL = {
    "aten.view",
    "aten._unsafe_view",
    "aten.unsqueeze",
    "aten.squeeze",
    "aten.expand",
    "aten.t",
    "aten.transpose",
    "aten.permute",
    "aten.select",
    "aten.slice",
    "aten.split",
    "aten.split_with_sizes",
    "aten.as_strided",
    "aten.alias",
    "aten.detach",
    "aten.empty",
    "aten.empty_like",
    "aten.empty_strided",
    "aten.lift_fresh",
    "profiler._record_function_enter_new",
    "profiler._record_function_exit",
}
HOST_READS = {"aten._local_scalar_dense", "aten.item"}

# Each variant: the recipe's POF fields overridden by these (None: plain training, no POF).
VARIANTS = {
    "plain": None,
    "recipe (pruned-forward epoch)": {},
    "recipe without pruned forwards (its dense epoch)": {"pruned_forward": 0.0},
    "pruned forwards only, every step": {"penalty_weight": 0.0, "pruned_forward": 1.0},
    "penalty every 4th call, no pruned forwards": {"pruned_forward": 0.0, "penalty_every": 4},
}


class _OperatorCount(TorchDispatchMode):
    def __init__(self) -> None:
        super().__init__()
        self.counts: Counter[str] = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))


def _split(counts: Counter[str]) -> dict[str, int]:
    reads = sum(n for op, n in counts.items() if op in HOST_READS)
    views = sum(n for op, n in counts.items() if op in NO_KERNEL)
    return {"kernels": sum(counts.values()) - reads - views, "views": views, "host_reads": reads}


def count_steps(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, steps: int) -> dict[str, object]:
    optimizer = create_optimizer_v2(model, opt="sgd", lr=0.01, weight_decay=5e-4, momentum=0.9, foreach=True)
    per_step, heaviest = [], Counter()
    model.train()
    for _ in range(steps):
        mode = _OperatorCount()
        with mode:
            loss = F.cross_entropy(model(images), labels) + model.penalty()
            loss.backward()
            optimizer.step()
            model.on_step_end()
            optimizer.zero_grad()
        per_step.append(_split(mode.counts))
        if sum(mode.counts.values()) > sum(heaviest.values()):
            heaviest = mode.counts
    kernels = [s["kernels"] for s in per_step]
    median_step = per_step[kernels.index(sorted(kernels)[len(kernels) // 2])]
    return {
        "median_kernels": statistics.median(kernels),
        "mean_kernels": statistics.mean(kernels),
        "max_kernels": max(kernels),
        "max_host_reads": max(s["host_reads"] for s in per_step),
        "median_step": median_step,
        "heaviest_step_top_ops": heaviest.most_common(12),
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "cifar10_finetune_pof.yaml"))
    p.add_argument("--model", default="resnet18")
    p.add_argument("--model_kwargs", type=json.loads, default={"channels": [32, 64, 128, 256], "stem_width": 32})
    p.add_argument("--img_size", type=int, default=36)
    p.add_argument("--batch_size", type=int, default=8, help="does not change the counts; small is quick")
    p.add_argument("--steps", type=int, default=40, help="covers the candidate refreshes (every 10 steps)")
    p.add_argument("--results", default=str(ROOT / "bench" / "results"))
    p.add_argument("--stem", default="pof_step_ops")
    args = p.parse_args()
    torch.set_num_threads(1)
    # The penalty's layers stacked as on a GPU (a CPU cuts the stacks into cache-sized pieces): GPU launches counted.
    pof_penalty.CPU_STACK_ENTRIES = 2**62
    recipe = recipe_prune_config(args.config)
    method = recipe.pop("method")
    torch.manual_seed(0)
    images = torch.randn(args.batch_size, 3, args.img_size, args.img_size)
    labels = torch.randint(0, 10, (args.batch_size,))
    rows = []
    for name, override in VARIANTS.items():
        torch.manual_seed(0)
        model = timm.create_model(args.model, num_classes=10, **args.model_kwargs)
        config = (
            timm_prune.PruneConfig(method="magnitude")
            if override is None
            else timm_prune.PruneConfig(method=method, **{**recipe, **override})
        )
        row = {"variant": name, **count_steps(timm_prune.convert(model, config), images, labels, args.steps)}
        row["layers"] = len(timm_prune.convert(timm.create_model(args.model, **args.model_kwargs), config).targets)
        rows.append(row)
        print(f"{name}: {row['median_kernels']} kernels per step (median), {row['max_kernels']} max", flush=True)
    plain, plain_mean = rows[0]["median_kernels"], rows[0]["mean_kernels"]
    lines = [
        f"# Operators per training step, {args.model} ({rows[0]['layers']} targeted layers)",
        "",
        f"Recipe: `{Path(args.config).name}`; torch {torch.__version__}; {args.steps} steps per variant; the "
        "optimizer's foreach path. Kernels: operators that run one (views and scalar reads apart).",
        "",
        "| variant | kernels per step: median | x plain | mean | x plain | most (a refresh) | views | host reads | "
        "most host reads |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        step = row["median_step"]
        lines.append(
            f"| {row['variant']} | {row['median_kernels']:.0f} | x{row['median_kernels'] / plain:.2f} | "
            f"{row['mean_kernels']:.0f} | x{row['mean_kernels'] / plain_mean:.2f} | {row['max_kernels']} | "
            f"{step['views']} | {step['host_reads']} | {row['max_host_reads']} |"
        )
    payload = {
        "model": args.model,
        "model_kwargs": args.model_kwargs,
        "config": args.config,
        "img_size": args.img_size,
        "torch": torch.__version__,
        "steps": args.steps,
        "rows": rows,
    }
    write_figures(Path(args.results), args.stem, payload, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
