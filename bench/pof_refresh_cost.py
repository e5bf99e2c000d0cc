"""POF training-step cost against plain training with exact and sampled global candidate thresholds.

The benchmark v2 model (half-width ResNet-18, batches of 128 at 36 px, fp32, one thread) on random images; each
case interleaves POF and plain steps on identical batches (``_cifar10_eval.step_time_ratio``). The median ratio
leaves out the candidate re-selection (every ``threshold_refresh``-th step); the mean ratio counts it, which is
what ``threshold_sample`` changes for ``scope="global"``: one exact global selection per nested level
(``threshold_sample=0``) against every level's threshold from one sample over all layers (the default).
Writes bench/results/pof_refresh_cost.{json,md}.

    OMP_NUM_THREADS=1 python bench/pof_refresh_cost.py            # 100 steps per case, about 4 minutes
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _cifar10_eval import step_time_ratio

RESULTS = Path(__file__).resolve().parent / "results"
HALF_WIDTH = {"channels": [32, 64, 128, 256], "stem_width": 32}
LEVELS = {"scope": "global", "penalty_sparsities": [0.5, 0.7, 0.9, 0.95, 0.98], "sparsity": 0.9}
CASES = {
    "pof_pf, exact": {"pruned_forward": 0.5, "penalty_weight": 0.0, "threshold_sample": 0},
    "pof_pf, sampled": {"pruned_forward": 0.5, "penalty_weight": 0.0},
    "pof_pf25, sampled": {"pruned_forward": 0.25, "penalty_weight": 0.0},
    "pof (penalty 300), exact": {"threshold_sample": 0},
    "pof (penalty 300), sampled": {},
}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args()
    torch.set_num_threads(1)
    torch.manual_seed(0)
    images, labels = torch.randn(128, 3, 36, 36), torch.randint(0, 10, (128,))
    rows = {}
    for name, options in CASES.items():
        config = {**LEVELS, "penalty_warmup": 175, "threshold_refresh": 10, **options}
        rows[name] = step_time_ratio("resnet18", HALF_WIDTH, images, labels, config, steps=args.steps)
        print(name, {k: round(v, 4) for k, v in rows[name].items()}, flush=True)
    lines = [
        "# POF step cost: exact vs sampled global candidate thresholds",
        "",
        f"Half-width ResNet-18, batch 128 at 36 px, fp32, one thread, {args.steps} interleaved steps per case.",
        "",
        "| case | median step ratio | mean step ratio (with re-selection steps) |",
        "|---|---:|---:|",
    ]
    lines += [f"| {n} | x{r['step_time_ratio']:.3f} | x{r['mean_step_time_ratio']:.3f} |" for n, r in rows.items()]
    out = Path(args.results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "pof_refresh_cost.json").write_text(json.dumps(rows, indent=2) + "\n")
    (out / "pof_refresh_cost.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
