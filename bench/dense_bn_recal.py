"""Dense top-1 of benchmark v2's fine-tuned models before and after BatchNorm re-estimation (a diagnostic).

Pruned models are reported with their BatchNorm statistics re-estimated on clean training images; the dense rows
of ``cifar10_v2.json`` are not. This measures what the re-estimation alone gives each dense model, so that a gap
at low sparsity can be told apart from a gap the dense model already had.

    python bench/dense_bn_recal.py --runs plain-s0 pof_pf95-s0    # run names under --workdir

Reads each run's last epoch checkpoint and, for POF runs, the options from ``--results`` (``pof_options`` and
``pof_variants``); writes bench/results/dense_bn_recal.json.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar10_eval import DataSpec, create_model, dense_checkpoint, load_eval_tensors, split_batches, top1  # noqa: E402
from _cifar10_v2_report import atomic_write_text  # noqa: E402
from cifar10_v2 import HALF_WIDTH  # noqa: E402

import timm_prune  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent


def run_config(run: str, results: dict) -> timm_prune.PruneConfig:
    """The config a run was trained with: magnitude for plain runs, POF with its variant's options otherwise."""
    contender = run.rsplit("-s", 1)[0]
    if contender == "plain":
        return timm_prune.PruneConfig(method="magnitude", sparsity=0.5)
    variants = results.get("pof_variants", {})
    if contender != "pof" and contender not in variants:
        raise SystemExit(f"{run}: contender {contender!r} is neither plain, pof nor one of {sorted(variants)}")
    options = {**results["pof_options"], **variants.get(contender, {})}
    return timm_prune.PruneConfig(method="pof", sparsity=0.5, **options)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", nargs="+", required=True)
    p.add_argument("--workdir", default=str(ROOT / "bench" / "runs_v2"))
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "cifar10_v2.json"))
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--img_size", type=int, default=36)
    p.add_argument("--bn_batches", type=int, default=10)
    p.add_argument("--out", default=str(ROOT / "bench" / "results" / "dense_bn_recal.json"))
    args = p.parse_args()
    torch.set_num_threads(1)
    results = json.loads(Path(args.results).read_text())
    configs = {run: run_config(run, results) for run in args.runs}  # bad names fail before any evaluation
    data = DataSpec(args.data, args.img_size, 0.1, 0, 128, None)
    rows, tensors = [], None
    for run, config in configs.items():
        started = time.time()
        pm = timm_prune.convert(create_model("resnet18", HALF_WIDTH), config)
        pm.load_state_dict(dense_checkpoint(str(Path(args.workdir, run))))
        if tensors is None:
            tensors = load_eval_tensors(data, pm, "test")
        (images, labels), (bn_images, _) = tensors
        dense = top1(pm, images, labels)
        pm.recalibrate_batchnorm(split_batches(bn_images, data.batch_size, args.bn_batches), args.bn_batches)
        recal = top1(pm, images, labels)
        rows.append({"run": run, "dense": round(100 * dense, 2), "dense_bn_recal": round(100 * recal, 2)})
        print(json.dumps(rows[-1]), f"({time.time() - started:.0f} s)", flush=True)
    command = "python bench/dense_bn_recal.py " + " ".join(sys.argv[1:])
    atomic_write_text(Path(args.out), json.dumps({"command": command, "split": "test", "rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
