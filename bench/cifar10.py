"""Retrain-free pruning on CIFAR-10: POF against magnitude-pruning baselines, with cost and ablations.

    python bench/cifar10.py --data ../shared/datasets/cifar10            # A, B and four ablations (~45 min, 2 cores)
    python bench/cifar10.py --data ../shared/datasets/cifar10 --quick    # a smoke run of every stage (minutes)

Every model is trained by the project's own recipe (``recipes/train.py``, one process per run, ``--jobs`` runs
side by side, one thread each), with the same architecture, seed, data, epochs and schedule:

- A: plain training (``--method magnitude``: no re-parametrisation, no penalty);
- B: POF (hyperspherical layers + polarizing penalty), with the library's defaults;
- ablations of POF (penalty weight, global scope, warm-up, refresh interval, nested sparsities).

Each trained model is then pruned without fine-tuning at every sparsity, per layer and with one global
threshold, and evaluated as is (``zero``), with the data-free recoveries (``mean``, ``layer_mean``, ``renorm``)
and with BatchNorm re-estimated on a few training batches (``bn_recal``, ``mean+bn_recal``). Choices (the
ablation) are made on a held-out 10 % of train; the reported figures are on the test split. The step-time ratio
of B over A is measured in this process on identical batches, interleaved, and ``prune()``'s cost on large
randomly initialised models comes from ``bench/prune_cost.py``'s measurement.

Writes bench/results/cifar10.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar10_eval import (  # noqa: E402
    DataSpec,
    EvalJob,
    create_model,
    dead_weight_fraction,
    dense_checkpoint,
    fresh_dead_weight_fraction,
    load_eval_tensors,
    run_eval_job,
    step_time_ratio,
)
from _cifar10_report import DATA_FREE_CHOICES, atomic_write_text, decide, write_results  # noqa: E402
from _recipe_runner import recipe_command, train_one  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
# Half-width ResNet-18 (channels 32-256): the full suite fits 90 minutes on 2 CPU cores.
DEFAULT_MODEL_KWARGS = "{channels: [32, 64, 128, 256], stem_width: 32}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"), help="CIFAR-10 (parquet)")
    p.add_argument("--model", default="resnet18", help="any timm model name")
    p.add_argument("--model_kwargs", default=DEFAULT_MODEL_KWARGS, help="create_model kwargs, YAML mapping")
    # 36 px: the smallest input at which ResNet-18's layer4 maps are 2x2, not 1x1 (at 32 px 62 % of its weights
    # only ever see padding and get no gradient; the run checks and reports the fraction).
    p.add_argument("--img_size", type=int, default=36)
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--lr", type=float, default=0.1)
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95, 0.98])
    p.add_argument("--pof_sparsity", type=float, default=0.9, help="sparsity POF trains for (B and ablations)")
    p.add_argument(
        "--ablations",
        nargs="*",
        choices=ABLATIONS,
        default=["pof_pw3000", "pof_global", "pof_warmup", "pof_nested"],
        help="POF runs that each change one switch (none: only A and B)",
    )
    p.add_argument("--prune_cost", action=argparse.BooleanOptionalAction, default=True)
    p.add_argument(
        "--prune_cost_models", nargs="+", default=["resnet50", "vit_base_patch16_224", "vit_large_patch16_224"]
    )
    p.add_argument("--bn_batches", type=int, default=10)
    p.add_argument("--validation_fraction", type=float, default=0.1, help="held-out part of train for choices")
    p.add_argument("--seed", type=int, default=42)
    p.add_argument("--jobs", type=int, default=2, help="runs trained / evaluated side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument("--workdir", default=str(ROOT / "bench" / "runs"), help="recipe outputs (reused when complete)")
    p.add_argument("--retrain", action="store_true", help="train again even when a run's outputs exist")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 epoch, 2 sparsities, 2 ablations")
    p.add_argument("--cost_only", action="store_true", help="only the checks, step-time ratio and prune() cost")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.epochs, args.max_train_samples, args.max_eval_samples = 1, 1024, 500
        args.sparsities, args.prune_cost_models = [0.5, 0.9], ["resnet18"]
        args.ablations = ["pof_pw3000", "pof_nested"]
        args.workdir, args.results = args.workdir + "_quick", os.path.join(args.results, "quick")
    args.model_kwargs = yaml.safe_load(args.model_kwargs) or {}
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data!r} is not a directory; point it at CIFAR-10 (e.g. ../shared/datasets/cifar10)")
    if not 0 < args.pof_sparsity < 1 or not all(0 <= s < 1 for s in args.sparsities):
        p.error("--pof_sparsity must be in (0, 1) and every --sparsities value in [0, 1)")
    return args


ABLATIONS = ("pof_pw30", "pof_pw3000", "pof_global", "pof_warmup", "pof_refresh100", "pof_nested", "pof_combined")


def run_specs(args: argparse.Namespace, steps_per_epoch: int) -> dict[str, dict[str, Any]]:
    """Name -> recipe method flags. "plain" is A, "pof" is B (defaults); the rest vary one POF switch each."""
    pof = {"method": "pof", "sparsity": args.pof_sparsity}
    nested = sorted(set(args.sparsities) - {0.0})
    specs = {"plain": {"method": "magnitude", "sparsity": args.pof_sparsity}, "pof": dict(pof)}
    ablations = {
        "pof_pw30": {**pof, "penalty_weight": 30.0},
        "pof_pw3000": {**pof, "penalty_weight": 3000.0},
        "pof_global": {**pof, "scope": "global"},
        "pof_warmup": {**pof, "penalty_warmup": steps_per_epoch},
        "pof_refresh100": {**pof, "threshold_refresh": 100},
        "pof_nested": {**pof, "penalty_sparsities": nested},
        # The three switches that helped one at a time, together.
        "pof_combined": {**pof, "scope": "global", "penalty_warmup": steps_per_epoch, "penalty_sparsities": nested},
    }
    specs.update({name: ablations[name] for name in args.ablations})
    return specs


def run_command(args: argparse.Namespace, name: str, flags: dict[str, Any]) -> list[str]:
    common = {
        "model": args.model,
        "model_kwargs": json.dumps(args.model_kwargs),
        "dataset": args.data,
        "image_column": "img",
        "label_column": "label",
        "validation_split": "holdout",
        "validation_fraction": args.validation_fraction,
        "img_size": args.img_size,
        "crop_pct": 1.0,
        "hflip": 0.5,
        "scale": [0.35, 1.0],
        "epochs": args.epochs,
        "batch_size": args.batch_size,
        "opt": "sgd",
        "lr": args.lr,
        "momentum": 0.9,
        "weight_decay": 5e-4,
        "sched": "cosine",
        "warmup_epochs": 1 if args.epochs > 2 else 0,
        "seed": args.seed,
        "bn_batches": args.bn_batches,
        "checkpointing_steps": "epoch",
        "overwrite_output_dir": True,  # a run folder without metrics.json is an unfinished attempt
        "report_to": "jsonl",
        "num_workers": 1,
        "cpu": True,
        "output_dir": os.path.join(args.workdir, name),
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
    }
    return recipe_command({**common, **flags})


def train_all(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> dict[str, float]:
    jobs, seconds = [], {}
    for name, flags in specs.items():
        out = os.path.join(args.workdir, name)
        if not args.retrain and os.path.exists(os.path.join(out, "metrics.json")):
            print(f"[train] {name}: reusing {out}", flush=True)
            continue
        os.makedirs(out, exist_ok=True)
        jobs.append((run_command(args, name, flags), os.path.join(out, "train.log"), args.threads, {}))
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for log_path, took in pool.map(train_one, jobs):
            name = Path(log_path).parent.name
            seconds[name] = took
            print(f"[train] {name}: {took / 60:.1f} min", flush=True)
    return seconds


def eval_jobs(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> list[EvalJob]:
    data = DataSpec(
        args.data, args.img_size, args.validation_fraction, args.seed, args.batch_size, args.max_eval_samples
    )
    jobs = []

    def job(name: str, split: str, scopes: list[str], variants: list[str]) -> EvalJob:
        flags = specs[name]
        options = {k: v for k, v in flags.items() if k not in ("method", "sparsity", "scope")}
        return EvalJob(
            run=name,
            run_dir=os.path.join(args.workdir, name),
            model=args.model,
            model_kwargs=args.model_kwargs,
            method=flags["method"],
            options=options,
            split=split,
            scopes=scopes,
            sparsities=args.sparsities,
            variants=variants,
            bn_batches=args.bn_batches,
            data=data,
            threads=args.threads,
        )

    # Reported figures (test): A per layer and global, zero and BatchNorm re-estimated (the baselines); POF with
    # the data-free recoveries and BatchNorm; POF trained for nested sparsities.
    baseline = ["zero", "bn_recal"]
    jobs.append(job("plain", "test", ["layer", "global"], baseline))
    jobs.append(job("pof", "test", ["layer"], ["zero", "mean", "renorm", "bn_recal", "mean+bn_recal"]))
    jobs.append(job("pof", "test", ["global"], ["zero"]))
    if "pof_nested" in specs:
        jobs.append(job("pof_nested", "test", ["layer"], ["zero", "mean", "bn_recal"]))
    for name in ("pof_global", "pof_combined"):
        if name in specs:
            jobs.append(job(name, "test", ["global"], ["zero", "mean", "bn_recal"]))
    # Decisions (held-out part of train): the data-free recoveries on A and B; each ablation at its own scope.
    for name, flags in specs.items():
        variants = list(DATA_FREE_CHOICES) if name in ("plain", "pof") else ["zero", "mean"]
        jobs.append(job(name, "val", [flags.get("scope", "layer")], variants))
    return jobs


def reuse_rows(args: argparse.Namespace, jobs: list[EvalJob]) -> tuple[list[dict[str, Any]], list[EvalJob]]:
    """Rows of the previous results file that a job would measure again (same run, split, grid, data): reused
    unless --retrain, so adding one run to a finished benchmark evaluates only that run."""
    path = Path(args.results) / "cifar10.json"
    if args.retrain or not path.exists():
        return [], jobs
    previous = json.loads(path.read_text())
    same_data = all(
        previous.get(k) == v for k, v in (("img_size", args.img_size), ("epochs", args.epochs), ("model", args.model))
    )
    index = {(r["run"], r["split"], r["scope"], r["sparsity"], r["variant"]): r for r in previous.get("runs", [])}
    reused, todo = [], []
    for job in jobs:
        keys = [
            (job.run, job.split, scope, sparsity, variant)
            for scope in job.scopes
            for sparsity in job.sparsities
            for variant in job.variants
        ]
        if same_data and all(key in index for key in keys):
            reused.extend(index[key] for key in keys)
        else:
            todo.append(job)
    print(f"[eval] reusing {len(reused)} rows of {path}; {len(todo)} evaluation jobs to run", flush=True)
    return reused, todo


def checks_and_cost(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Dead-weight check (fresh and trained), and the step-time ratio of B over A on identical batches."""
    torch.set_num_threads(args.threads)
    model = create_model(args.model, args.model_kwargs)
    data = DataSpec(args.data, args.img_size, args.validation_fraction, args.seed, args.batch_size, 2 * args.batch_size)
    _, (images, labels) = load_eval_tensors(data, model, "val")
    batch = images[: args.batch_size], labels[: args.batch_size]
    pof_options = {k: v for k, v in specs["pof"].items() if k != "method"}
    pof_options.setdefault("threshold_refresh", 10)  # the recipe's default for POF
    out = {"dead_weights_fresh": fresh_dead_weight_fraction(args.model, args.model_kwargs, args.img_size)}
    print(f"[check] dead weights of a fresh model at {args.img_size} px: {100 * out['dead_weights_fresh']:.2f} %")
    out.update(step_time_ratio(args.model, args.model_kwargs, *batch, pof_options))
    print(
        f"[cost] step time POF / plain: median x{out['step_time_ratio']:.3f} (mean x{out['mean_step_time_ratio']:.3f})"
    )
    return out


def trained_dead_weights(args: argparse.Namespace) -> float:
    torch.set_num_threads(args.threads)
    model = create_model(args.model, args.model_kwargs)
    state = {k.removeprefix("model."): v for k, v in dense_checkpoint(os.path.join(args.workdir, "plain")).items()}
    model.load_state_dict(state)
    data = DataSpec(args.data, args.img_size, args.validation_fraction, args.seed, args.batch_size, 2 * args.batch_size)
    _, (images, labels) = load_eval_tensors(data, model, "val")
    return dead_weight_fraction(model, images[: args.batch_size], labels[: args.batch_size])


def prune_cost(args: argparse.Namespace) -> list[dict[str, Any]]:
    from prune_cost import measure

    torch.set_num_threads(args.threads)
    rows = []
    for name in args.prune_cost_models:
        rows.append(measure(name, 0.7, 3))
        print(
            f"[cost] prune() {name}: {rows[-1]['prune_s_median']:.2f} s, "
            f"extra {rows[-1]['peak_extra_mb_median']:.0f} MB"
        )
    return rows


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    train_size = (args.max_train_samples or 50_000 * (1 - args.validation_fraction)) // args.batch_size
    specs = run_specs(args, steps_per_epoch=int(train_size))
    results: dict[str, Any] = {"dataset": "cifar10", "model": args.model, "model_kwargs": args.model_kwargs}
    results.update(epochs=args.epochs, img_size=args.img_size, sparsities=args.sparsities, specs=specs)
    results["command"] = "python bench/cifar10.py " + " ".join(argv if argv is not None else sys.argv[1:])
    results.update(checks_and_cost(args, specs))
    if args.cost_only:
        results["prune_cost"] = prune_cost(args) if args.prune_cost else []
        results["wall_time_min"] = round((time.time() - started) / 60, 1)
        path = Path(args.results) / "cifar10_cost.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")
        print(f"done in {results['wall_time_min']} min; {path}")
        return
    results["train_seconds"] = train_all(args, specs)
    results["dead_weights_trained"] = trained_dead_weights(args)
    print(f"[check] dead weights of the trained plain model: {100 * results['dead_weights_trained']:.2f} %")
    jobs = eval_jobs(args, specs)
    rows, jobs = reuse_rows(args, jobs)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for part in pool.map(run_eval_job, jobs):
            rows.extend(part)
    results["runs"] = rows
    results["decisions"] = decide(rows, specs)
    if args.prune_cost:
        results["prune_cost"] = prune_cost(args)
    results["wall_time_min"] = round((time.time() - started) / 60, 1)
    write_results(results, Path(args.results))
    print(f"done in {results['wall_time_min']} min; results in {args.results}")


if __name__ == "__main__":
    main()
