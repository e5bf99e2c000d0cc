"""POF's candidate re-selection on LAMP scores: sampled against exact, against one global threshold, on ConvNeXt-atto.

Two measurements, one thread, bf16 autocast with channels-last tensors as benchmark v2 trains ConvNeXt:

- the re-selection alone (``select_candidates()``, the ConvNeXt recipe's four nested levels), median of
  ``--calls`` calls per scope: per layer, one global threshold on ``|w|``, LAMP with each layer larger than
  ``lamp_sample`` estimated from a sample (the default), and exact LAMP (``lamp_sample=0``: one sort per layer);
- the training step of the ConvNeXt recipe's POF settings against plain training, interleaved on identical batches
  (``_cifar10_eval.step_time_ratio``), with GMP as the reference. The median ratio leaves out the re-selection
  (every 10th step); the mean ratio counts it.

Writes bench/results/convnext_atto/lamp_refresh_cost.{json,md}.

    OMP_NUM_THREADS=1 python bench/lamp_refresh_cost.py            # about 6 minutes on a quiet machine
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import timm
import torch
from _cifar10_eval import step_time_ratio
from _cifar10_v2_report import write_figures
from _recipe_runner import ROOT, recipe_prune_config

import timm_prune

RESULTS = Path(__file__).resolve().parent / "results" / "convnext_atto"
MODEL = "convnext_atto"
# The ConvNeXt fine-tuning recipe's POF settings, as recipes/train.py reads them.
RECIPE = recipe_prune_config(ROOT / "recipes" / "configs" / "cifar10_finetune_pof_convnext.yaml")
SCOPES = {
    "per layer": {"scope": "layer"},
    "global": {"scope": "global"},
    "lamp, sampled (default)": {"scope": "lamp"},
    "lamp, exact": {"scope": "lamp", "lamp_sample": 0},
}


def reselection_seconds(options: dict, calls: int) -> float:
    torch.manual_seed(0)
    model = timm.create_model(MODEL, num_classes=10).to(memory_format=torch.channels_last)
    pruner = timm_prune.convert(model, timm_prune.PruneConfig(**{**RECIPE, **options})).pruner
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        pruner.select_candidates()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--calls", type=int, default=11)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    reselection = {name: reselection_seconds(options, args.calls) for name, options in SCOPES.items()}
    for name, seconds in reselection.items():
        print(f"[re-selection] {name}: {seconds:.4f} s", flush=True)
    torch.manual_seed(0)
    images, labels = torch.randn(128, 3, 32, 32), torch.randint(0, 10, (128,))
    steps = {}
    for name, options in list(SCOPES.items())[1:]:
        config = {k: v for k, v in {**RECIPE, **options}.items() if k != "method"}
        steps[name] = step_time_ratio(MODEL, {}, images, labels, config, steps=args.steps, bf16=True)
        print(f"[step] {name}", {k: round(v, 4) for k, v in steps[name].items()}, flush=True)
    gmp = {"sparsity": 0.9, "update_every": 10}
    steps["gmp"] = step_time_ratio(MODEL, {}, images, labels, gmp, steps=args.steps, method="gmp", bf16=True)
    print("[step] gmp", {k: round(v, 4) for k, v in steps["gmp"].items()}, flush=True)
    lines = [
        "# POF candidate re-selection on LAMP scores, ConvNeXt-atto",
        "",
        f"One thread, bf16, channels-last; re-selection: median of {args.calls} calls (4 nested levels); steps: "
        f"{args.steps} interleaved POF / plain steps per case, batch 128 at 32 px.",
        "",
        "| scope | re-selection (s) | median step ratio | mean step ratio (with re-selections) |",
        "|---|---:|---:|---:|",
    ]
    for name, seconds in reselection.items():
        row = steps.get(name)
        ratios = f"x{row['step_time_ratio']:.3f} | x{row['mean_step_time_ratio']:.3f}" if row else "- | -"
        lines.append(f"| {name} | {seconds:.3f} | {ratios} |")
    row = steps["gmp"]
    lines.append(f"| GMP (reference) | - | x{row['step_time_ratio']:.3f} | x{row['mean_step_time_ratio']:.3f} |")
    out = Path(args.results)
    payload = {"model": MODEL, "recipe": RECIPE, "reselection_s": reselection, "steps": steps}
    write_figures(out, "lamp_refresh_cost", payload, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
