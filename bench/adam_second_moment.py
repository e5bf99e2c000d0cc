"""How large two fine-tuning runs' AdamW second-moment estimates are, layer by layer (a diagnostic).

AdamW divides each step by the root of its running mean of squared gradients (``exp_avg_sq``): where one run's
gradients were larger, its steps there are smaller for as long as the estimate remembers them (beta2 = 0.999: about
a thousand steps). This compares the estimates two runs saved at the end of an epoch (``checkpoints/epoch_N``,
written by ``recipes/train.py --checkpointing_steps epoch``): per parameter, the mean of ``sqrt(exp_avg_sq)`` in run
A over run B, listed for the weights (2-D and up) in the model's order.

    python bench/adam_second_moment.py bench/runs_lr_b/pof_...-s0 bench/runs_lr_a/plain-s0 --epoch 0

Both runs must train the same model with the same optimizer parameter groups. Reads ``optimizer.bin`` with
``torch.load(weights_only=True)`` (tensors and numbers only: nothing is unpickled beyond that).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar10_v2_report import atomic_write_text  # noqa: E402


def _second_moments(run: Path, epoch: int) -> dict[int, torch.Tensor]:
    path = run / "checkpoints" / f"epoch_{epoch}" / "optimizer.bin"
    if not path.exists():
        raise SystemExit(f"{path}: no such file; the run must have been trained with --checkpointing_steps epoch")
    state = torch.load(path, map_location="cpu", weights_only=True)["state"]
    return {index: s["exp_avg_sq"] for index, s in state.items() if "exp_avg_sq" in s}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("run_a", type=Path)
    p.add_argument("run_b", type=Path)
    p.add_argument("--epoch", type=int, default=0, help="the checkpoint checkpoints/epoch_N of both runs")
    p.add_argument("--out", type=Path, default=None, help="JSON to write (default: print only)")
    args = p.parse_args()
    a, b = _second_moments(args.run_a, args.epoch), _second_moments(args.run_b, args.epoch)
    if a.keys() != b.keys() or any(a[i].shape != b[i].shape for i in a):
        raise SystemExit("the two runs' optimizer states differ in their parameters: not the same model and groups")
    rows = []
    for index in sorted(a):
        ratio = float(a[index].sqrt().mean() / b[index].sqrt().mean().clamp_min(1e-30))
        rows.append({"param": index, "shape": list(a[index].shape), "sqrt_v_ratio": ratio})
    weights = [r for r in rows if len(r["shape"]) > 1]
    summary = {
        "median_all": statistics.median(r["sqrt_v_ratio"] for r in rows),
        "median_weights": statistics.median(r["sqrt_v_ratio"] for r in weights),
    }
    print(f"median sqrt(v) A / B: all parameters {summary['median_all']:.3f}, weights {summary['median_weights']:.3f}")
    for i, r in enumerate(weights):
        print(f"weight {i:3d} {str(tuple(r['shape'])):<20} {r['sqrt_v_ratio']:8.3f}")
    if args.out is not None:
        record = {"run_a": str(args.run_a), "run_b": str(args.run_b), "epoch": args.epoch, **summary, "rows": rows}
        atomic_write_text(args.out, json.dumps(record, indent=2) + "\n")
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
