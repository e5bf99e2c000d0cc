"""Cost of ``prune()`` with one global threshold on large randomly initialised timm models.

Measures wall time and the peak extra resident memory of ``prune()`` (scope="global") against the size of the
model itself, to show both grow linearly with the parameter count (the threshold is an exact radix selection,
layer by layer; nothing is concatenated). Baseline measured in the same run: a plain dense forward pass at
batch 1, whose cost also grows with the model. Writes bench/results/prune_cost.{json,md,png}.

    python bench/prune_cost.py                       # resnet50, vit_base_patch16_224, vit_large_patch16_224
    python bench/prune_cost.py --models resnet18 --repeats 1
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import threading
import time
from pathlib import Path

import psutil
import timm
import torch

import timm_prune

RESULTS = Path(__file__).resolve().parent / "results"


class PeakRss:
    """Samples this process's resident memory every few ms; ``peak`` is the max seen inside the block."""

    def __init__(self, interval: float = 0.005) -> None:
        self.interval, self.peak, self._stop = interval, 0, threading.Event()
        self._process = psutil.Process(os.getpid())

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            time.sleep(self.interval)

    def __enter__(self) -> PeakRss:
        self.start = self._process.memory_info().rss
        self.peak = self.start
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def measure(name: str, sparsity: float, repeats: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, pretrained=False).eval()
    size = model.pretrained_cfg["input_size"]
    x = torch.randn(1, *size)
    params = sum(p.numel() for p in model.parameters())
    forward_times, prune_times, extra = [], [], []
    for _ in range(repeats):
        with torch.no_grad():
            start = time.perf_counter()
            model(x)
            forward_times.append(time.perf_counter() - start)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(sparsity=sparsity, scope="global"))
    targeted = sum(m.weight.numel() for m in pm.targets.values())
    for _ in range(repeats):
        gc.collect()
        with PeakRss() as rss:
            start = time.perf_counter()
            report = pm.prune()
            prune_times.append(time.perf_counter() - start)
        extra.append(rss.peak - rss.start)
    return {
        "model": name,
        "params": params,
        "targeted_weights": targeted,
        "weights_mb": targeted * 4 / 2**20,
        "sparsity": report.sparsity,
        "prune_s_median": statistics.median(prune_times),
        "forward_s_median": statistics.median(forward_times),
        "prune_over_forward": statistics.median(prune_times) / statistics.median(forward_times),
        "peak_extra_mb_median": statistics.median(extra) / 2**20,
        "peak_extra_over_weights": statistics.median(extra) / (targeted * 4),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", nargs="+", default=["resnet50", "vit_base_patch16_224", "vit_large_patch16_224"])
    parser.add_argument("--sparsity", type=float, default=0.7)
    parser.add_argument("--repeats", type=int, default=3)
    # One thread: on a shared 2-core machine, 2 OpenMP threads next to any other load slow down ~25x.
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        row = measure(name, args.sparsity, args.repeats)
        rows.append(row)
        print(json.dumps(row))
        gc.collect()
    RESULTS.mkdir(parents=True, exist_ok=True)
    (RESULTS / "prune_cost.json").write_text(json.dumps({"args": vars(args), "rows": rows}, indent=2) + "\n")
    lines = [
        "| model | targeted weights | prune() s (median) | prune / dense forward | peak extra MB | extra / weights |",
        "|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['targeted_weights'] / 1e6:.1f}M | {r['prune_s_median']:.2f} | "
            f"{r['prune_over_forward']:.1f}x | {r['peak_extra_mb_median']:.0f} | {r['peak_extra_over_weights']:.2f} |"
        )
    table = "\n".join(lines)
    (RESULTS / "prune_cost.md").write_text(table + "\n")
    print(table)
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(9, 3.5))
    n = [r["targeted_weights"] / 1e6 for r in rows]
    ax_time.plot(n, [r["prune_s_median"] for r in rows], "o-")
    ax_time.set(xlabel="targeted weights (M)", ylabel="prune() seconds", title="global prune time")
    ax_mem.plot(n, [r["peak_extra_mb_median"] for r in rows], "o-", label="peak extra RSS")
    ax_mem.plot(n, [r["weights_mb"] for r in rows], "--", label="size of the weights")
    ax_mem.set(xlabel="targeted weights (M)", ylabel="MB", title="global prune memory")
    ax_mem.legend()
    fig.tight_layout()
    fig.savefig(RESULTS / "prune_cost.png", dpi=120)


if __name__ == "__main__":
    main()
