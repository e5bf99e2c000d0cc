"""README's quickstart loop, timed: a POF step over a plain step, with the old default (threshold_refresh=1:
re-select the candidates every step) and the new one (10), interleaved in one process (issue 16, item 8).

    OMP_NUM_THREADS=1 python bench/quickstart_step_cost.py [--rounds 40] [--threads 1]

Each round runs one optimizer step of every variant on the same batch (resnet18, 16 x 3 x 64 x 64, AdamW, as in
the quickstart), in a rotated order; the ratio of adjacent steps is taken per round and the median (with its
quartiles) reported, so load from other processes shifts both sides of a ratio alike. Results:
``bench/results/quickstart_step_cost.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import time

import timm
import torch
import torch.nn.functional as F

import timm_prune

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", "quickstart_step_cost.json")


def build(variant: str) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    torch.manual_seed(0)
    model = timm.create_model("resnet18", num_classes=10)
    if variant != "plain":
        refresh = int(variant.split("_")[-1])
        model = timm_prune.convert(model, timm_prune.PruneConfig(method="pof", sparsity=0.7, threshold_refresh=refresh))
    return model, torch.optim.AdamW(model.parameters(), lr=1e-3)


def step(model: torch.nn.Module, optimizer: torch.optim.Optimizer, x: torch.Tensor, y: torch.Tensor) -> float:
    start = time.perf_counter()
    loss = F.cross_entropy(model(x), y)
    if isinstance(model, timm_prune.PrunableModel):
        loss = loss + model.penalty()
    loss.backward()
    optimizer.step()
    optimizer.zero_grad()
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", default=RESULTS)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)

    variants = ["plain", "pof_refresh_1", "pof_refresh_10"]
    built = {v: build(v) for v in variants}
    for model, _ in built.values():
        model.train()
    generator = torch.Generator().manual_seed(0)
    times: dict[str, list[float]] = {v: [] for v in variants}
    for round_ in range(args.warmup + args.rounds):
        x = torch.randn(16, 3, 64, 64, generator=generator)
        y = torch.randint(0, 10, (16,), generator=generator)
        order = variants[round_ % 3 :] + variants[: round_ % 3]  # rotate: no variant always runs first
        took = {v: step(*built[v], x, y) for v in order}
        if round_ >= args.warmup:
            for v in variants:
                times[v].append(took[v])

    def summary(values: list[float]) -> dict[str, float]:
        q = statistics.quantiles(values, n=4)
        return {"median": statistics.median(values), "q1": q[0], "q3": q[2]}

    result = {
        "what": "README quickstart loop (resnet18, batch 16 x 3 x 64 x 64, AdamW, sparsity 0.7): step time over plain",
        "threads": args.threads,
        "rounds": args.rounds,
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores",
        "torch": torch.__version__,
        "step_s": {v: summary(t) for v, t in times.items()},
        "ratio_over_plain": {
            v: summary([a / b for a, b in zip(times[v], times["plain"], strict=True)]) for v in variants if v != "plain"
        },
    }
    os.makedirs(os.path.dirname(args.output), exist_ok=True)
    with open(args.output, "w") as f:
        json.dump(result, f, indent=2)
    for v, s in result["ratio_over_plain"].items():
        print(f"{v}: x{s['median']:.3f} (quartiles {s['q1']:.3f}-{s['q3']:.3f}) over plain")


if __name__ == "__main__":
    main()
