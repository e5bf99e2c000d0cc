"""Benchmark v2: prune a TRAINED model, with the same extra training budget for every contender, over seeds.

    python bench/cifar10_v2.py                     # base (once, ~30 min), then every contender, 3 seeds
    python bench/cifar10_v2.py --seeds 0           # one seed first (the rest later: finished runs are reused)
    python bench/cifar10_v2.py --quick             # every stage on tiny data, in minutes
    python bench/cifar10_v2.py --report_only       # tables and plot from the rows measured so far

Stages (each reuses what a previous invocation finished, so the benchmark can be run in parts):

1. base: one dense half-width ResNet-18 (``--model_kwargs``) trained plainly on CIFAR-10 (36 px; bf16 autocast and
   channels-last where the CPU has AMX) for 30 epochs, saved with ``save_pretrained`` under ``<workdir>/base``
   (``--retrain`` trains it again).
2. fine-tuning, ``--finetune_epochs`` (default 2) from the base through the recipe
   (``--model local-dir:<base> --pretrained``), same optimizer, schedule, data and seed for every contender:
   - ``plain``: plain fine-tuning; pruned afterwards by one-shot global magnitude;
   - ``pof``: POF fine-tuning (global, nested sparsities); ONE model pruned at every sparsity;
   - ``pof_*`` (``--pof_variants NAME=JSON``): POF with other options, e.g. pruned forwards;
   - ``gmp``: gradual magnitude pruning to each target sparsity (Zhu & Gupta); one run per sparsity;
3. zero-budget: ``base`` pruned one-shot with no training at all; ``wanda`` / ``sparsegpt`` (when registered) on
   the plain fine-tuned models and on the base.
4. evaluation at every sparsity with no further training: ``zero``, ``mean`` recovery, BatchNorm re-estimated on
   10 training batches (``bn_recal``), and both; top-1 on the test split (reported) and on a held-out part of
   train (choices: each contender's best variant is chosen there).
5. cost: wall time of each run and the per-step time of each method against plain, interleaved in one process.

Writes bench/results/cifar10_v2.{json,md,png}.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from multiprocessing import get_context
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar10_eval import DataSpec, EvalJob, create_model, load_eval_tensors, run_eval_job, step_time_ratio  # noqa: E402
from _cifar10_v2_report import atomic_write_text, write_results  # noqa: E402
from _recipe_runner import recipe_command, train_one  # noqa: E402

import timm_prune  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
# Half-width ResNet-18 (2.8M parameters, as bench/cifar10.py): full width (11.2M) lost at most 0.24 points to 90 %
# pruning on CIFAR-10 (no contender can stand out there), and the half width trains 2.9x faster on this CPU.
HALF_WIDTH = {"channels": [32, 64, 128, 256], "stem_width": 32}
RESULTS = ROOT / "bench" / "results"
# The default base, committed (11 MB): later sessions and users skip its 30-minute training.
BASE_CACHE = ROOT / "bench" / "base_cache"
FINETUNED = ("plain", "pof", "gmp")
ONE_SHOT = ("wanda", "sparsegpt")
# "layer_magnitude": the plain fine-tuned models and the base pruned by magnitude per layer (the same sparsity in
# every layer) instead of one global threshold; the fair baseline for nets whose layers' scales differ widely.
# "lamp_magnitude": the same with one threshold on each layer's LAMP scores (scope "lamp", Lee et al., ICLR 2021).
# Contender -> the magnitude scope its rows use; rows are labelled plain_<scope> and base_<scope>.
SCOPED_MAGNITUDE = {"layer_magnitude": "layer", "lamp_magnitude": "lamp"}
CONTENDERS = FINETUNED + ("base", *SCOPED_MAGNITUDE) + ONE_SHOT
VARIANTS = ["zero", "mean", "bn_recal", "mean+bn_recal"]
# Measured only when asked (--extra_variants): adding one to VARIANTS would make every run's rows incomplete.
EXTRA_VARIANTS = ["bias"]
# Calibration batches (of --batch_size un-augmented training images) per one-shot method. SparseGPT got fewer when
# it ran one forward pass per layer (before one_pass); kept at 4 so that its measured rows stay comparable.
ONE_SHOT_BATCHES = {"wanda": 8, "sparsegpt": 4}


def _cpu_has_amx() -> bool:
    try:
        return "amx_bf16" in Path("/proc/cpuinfo").read_text()
    except OSError:
        return False


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"), help="CIFAR-10 (parquet)")
    p.add_argument("--model", default="resnet18")
    p.add_argument(
        "--model_kwargs",
        default=json.dumps(HALF_WIDTH),
        help="create_model kwargs (JSON object); default: half-width ResNet-18 ('{}' for the full width)",
    )
    p.add_argument("--img_size", type=int, default=36, help="36: ResNet-18's layer4 maps are 2x2, not 1x1")
    p.add_argument("--base_epochs", type=int, default=30)
    p.add_argument("--base_lr", type=float, default=0.1)
    p.add_argument("--finetune_epochs", type=int, default=2)
    p.add_argument("--finetune_lr", type=float, default=0.01)
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--opt", default="sgd", help="optimizer of the base and of every fine-tuning (timm name)")
    p.add_argument("--weight_decay", type=float, default=5e-4)
    p.add_argument(
        "--base_cache",
        default=str(BASE_CACHE),
        help="committed copy of the base, restored when its flags match (one folder per architecture)",
    )
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--sparsities", type=float, nargs="+", default=[0.5, 0.7, 0.9, 0.95, 0.98])
    p.add_argument("--contenders", nargs="+", choices=CONTENDERS, default=list(CONTENDERS))
    p.add_argument(
        "--gmp_sparsities", type=float, nargs="+", default=None, help="GMP runs (one per sparsity); default: all"
    )
    p.add_argument(
        "--gmp_scope",
        choices=("layer", "global", "lamp"),
        default="global",
        help="GMP's masks: one global threshold (the ResNet's best), per layer, or on LAMP scores (ConvNeXt's)",
    )
    p.add_argument(
        "--pof_variants",
        nargs="*",
        default=[],
        metavar="NAME=JSON",
        help="extra POF contenders, e.g. pof_pf='{\"pruned_forward\": 0.5}' (options over the pof contender's), "
        "trained whether or not pof is among --contenders",
    )
    p.add_argument(
        "--extra_variants",
        nargs="*",
        choices=EXTRA_VARIANTS,
        default=[],
        help="also measure these (bias: prune with bias correction on the BatchNorm batches); runs without their "
        "rows are evaluated again (and trained again when their folders are gone)",
    )
    p.add_argument(
        "--finetune_split",
        choices=("base", "run"),
        default="base",
        help="the hold-out of each fine-tuning run: the base's (split seed 0), or the run's own seed, as every run "
        "before session 15 had it (its held-out rows then include images it trained on); 'run' pairs new runs with "
        "those rows",
    )
    p.add_argument("--bn_batches", type=int, default=10)
    p.add_argument("--val_samples", type=int, default=2000, help="held-out images used for choices")
    p.add_argument("--validation_fraction", type=float, default=0.1, help="held-out part of train")
    p.add_argument("--jobs", type=int, default=2, help="runs trained / evaluated side by side")
    p.add_argument("--threads", type=int, default=1, help="torch threads per job")
    p.add_argument(
        "--bf16",
        action=argparse.BooleanOptionalAction,
        default=_cpu_has_amx(),
        help="bf16 autocast + channels-last; default: on CPUs with AMX (2x there, 12%% slower without)",
    )
    p.add_argument("--workdir", default=str(ROOT / "bench" / "runs_v2"))
    p.add_argument("--retrain", action="store_true", help="train the base and every run again")
    p.add_argument("--report_only", action="store_true", help="write tables and plot from the measured rows")
    p.add_argument("--cost_only", action="store_true", help="with --report_only: measure the step-time ratios again")
    p.add_argument("--max_train_samples", type=int, default=None)
    p.add_argument("--max_eval_samples", type=int, default=None)
    p.add_argument("--quick", action="store_true", help="smoke run: tiny data, 1 epoch, 1 seed, 2 sparsities")
    p.add_argument("--results", default=str(RESULTS))
    args = p.parse_args(argv)
    if args.quick:
        args.base_epochs, args.finetune_epochs, args.seeds = 1, 1, [0]
        args.max_train_samples, args.max_eval_samples, args.val_samples = 1024, 500, 300
        args.sparsities = [0.5, 0.9]
        args.workdir, args.results = args.workdir + "_quick", os.path.join(args.results, "quick")
    if not os.path.isdir(args.data):
        p.error(f"--data {args.data!r} is not a directory; point it at CIFAR-10 (e.g. ../shared/datasets/cifar10)")
    if not all(0 < s < 1 for s in args.sparsities):
        p.error("every --sparsities value must be in (0, 1)")
    variants = {}
    for item in args.pof_variants:
        name, _, options = item.partition("=")
        try:
            variants[name] = json.loads(options)
        except json.JSONDecodeError as e:
            p.error(f"--pof_variants {item!r}: NAME=JSON with a JSON object of POF options ({e})")
        if not name.startswith("pof_") or not isinstance(variants[name], dict):
            p.error(f"--pof_variants {item!r}: the name must start with 'pof_' and the options be a JSON object")
    args.pof_variants = variants
    try:
        args.model_kwargs = json.loads(args.model_kwargs)
    except json.JSONDecodeError as e:
        p.error(f"--model_kwargs {args.model_kwargs!r} is not a JSON object ({e})")
    if not isinstance(args.model_kwargs, dict):
        p.error(f"--model_kwargs must be a JSON object, e.g. '{{\"channels\": [32, 64]}}'; got {args.model_kwargs!r}")
    args.gmp_sparsities = args.gmp_sparsities or args.sparsities
    args.variants = VARIANTS + [v for v in args.extra_variants if v not in VARIANTS]
    return args


# ---------------------------------------------------------------------------------------------- runs
def _recipe_flags(args: argparse.Namespace, seed: int) -> dict[str, Any]:
    return {
        "dataset": args.data,
        "image_column": "img",
        "label_column": "label",
        "validation_split": "holdout",
        "validation_fraction": args.validation_fraction,
        "img_size": args.img_size,
        "crop_pct": 1.0,
        "hflip": 0.5,
        "scale": [0.5, 1.0],
        "color_jitter": 0.0,
        "batch_size": args.batch_size,
        "opt": args.opt,
        "momentum": 0.9,
        "weight_decay": args.weight_decay,
        "sched": "cosine",
        "seed": seed,
        "bn_batches": args.bn_batches,
        "channels_last": args.bf16,
        "checkpointing_steps": "epoch",
        # A run folder without metrics.json is an unfinished attempt: start it again.
        "overwrite_output_dir": True,
        "report_to": "jsonl",
        "cpu": True,
        "max_train_samples": args.max_train_samples,
        "max_eval_samples": args.max_eval_samples,
    }


def base_flags(args: argparse.Namespace) -> dict[str, Any]:
    return {
        **_recipe_flags(args, seed=0),
        "model": args.model,
        "model_kwargs": json.dumps(args.model_kwargs) if args.model_kwargs else None,
        "method": "magnitude",
        "sparsity": 0.0,  # nothing pruned: the saved model is the dense base
        "epochs": args.base_epochs,
        "lr": args.base_lr,
        "warmup_epochs": 1,
    }


def pof_options(args: argparse.Namespace) -> dict[str, Any]:
    # The recipe's CIFAR POF settings (bench/cifar10.py's ablation): global, nested sparsities, warm-up over
    # half an epoch, candidates refreshed every 10 steps.
    steps_per_epoch = int((args.max_train_samples or 50_000 * (1 - args.validation_fraction)) // args.batch_size)
    return {
        "scope": "global",
        "penalty_sparsities": sorted(args.sparsities),
        "penalty_warmup": max(1, steps_per_epoch // 2),
        "threshold_refresh": 10,
    }


def finetune_specs(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    """Run name -> (contender, seed, method flags) of every fine-tuning run."""
    specs = {}
    for seed in args.seeds:
        if "plain" in args.contenders:
            specs[f"plain-s{seed}"] = {"contender": "plain", "seed": seed, "method": "magnitude", "sparsity": 0.0}
        # The default POF with "pof" among --contenders; every --pof_variants entry whenever it is given.
        sparsity = max((s for s in args.sparsities if s <= 0.9), default=min(args.sparsities))
        flags = {"method": "pof", "sparsity": sparsity, **pof_options(args)}
        if "pof" in args.contenders:
            specs[f"pof-s{seed}"] = {"contender": "pof", "seed": seed, **flags}
        for name, options in args.pof_variants.items():
            specs[f"{name}-s{seed}"] = {"contender": name, "seed": seed, **flags, **options}
        if "gmp" in args.contenders:
            for sparsity in args.gmp_sparsities:
                scope_suffix = "" if args.gmp_scope == "global" else f"_{args.gmp_scope}"
                specs[f"gmp{round(100 * sparsity)}{scope_suffix}-s{seed}"] = {
                    "contender": "gmp",
                    "seed": seed,
                    "method": "gmp",
                    "sparsity": sparsity,
                    "scope": args.gmp_scope,
                    "update_every": 10,
                }
    return specs


def _job(flags: dict[str, Any], output_dir: str, args: argparse.Namespace) -> tuple:
    env = {"ACCELERATE_MIXED_PRECISION": "bf16"} if args.bf16 else {}
    flags = {k: v for k, v in flags.items() if k != "contender"}
    return recipe_command({**flags, "output_dir": output_dir}), os.path.join(output_dir, "train.log"), args.threads, env


def _finished(run_dir: str) -> bool:
    return os.path.exists(os.path.join(run_dir, "metrics.json"))


def _base_recipe(args: argparse.Namespace) -> dict[str, Any]:
    """The base's flags that decide its weights (not where the data lies, nor the precision it ran in)."""
    return {k: v for k, v in base_flags(args).items() if k not in ("dataset", "channels_last", "overwrite_output_dir")}


def _restore_cached_base(args: argparse.Namespace, out: str) -> bool:
    """Copy the committed base (``--base_cache``) into ``out`` when it was trained with these flags."""
    cache = Path(args.base_cache)
    recorded = cache / "base_recipe.json"
    if not recorded.exists() or json.loads(recorded.read_text()) != json.loads(json.dumps(_base_recipe(args))):
        return False
    shutil.copytree(cache, out, dirs_exist_ok=True)
    print(f"[base] using the committed base {os.path.relpath(cache, ROOT)} (same flags; --retrain trains it)")
    return True


def cache_base(args: argparse.Namespace) -> None:
    """Commit-sized copy of the finished base (weights, config, metrics; no checkpoints) into ``--base_cache``."""
    cache = Path(args.base_cache)
    out = os.path.join(args.workdir, "base")
    tmp = cache.with_name(cache.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for name in ("model.safetensors", "config.json", "metrics.json", "README.md"):
        if os.path.exists(os.path.join(out, name)):
            shutil.copy2(os.path.join(out, name), tmp / name)
    (tmp / "base_recipe.json").write_text(json.dumps(_base_recipe(args), indent=2) + "\n")
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(tmp, cache)


def train_base(args: argparse.Namespace) -> dict[str, Any]:
    out = os.path.join(args.workdir, "base")
    if args.retrain and os.path.isdir(out):
        shutil.rmtree(out)
    if not _finished(out) and (args.retrain or args.quick or not _restore_cached_base(args, out)):
        os.makedirs(out, exist_ok=True)
        print(f"[base] training {args.model} for {args.base_epochs} epochs into {out}", flush=True)
        train_one(_job(base_flags(args), out, args))
        if not args.quick and args.max_train_samples is None:
            cache_base(args)
    metrics = json.loads(Path(out, "metrics.json").read_text())
    return {
        "model": args.model,
        "epochs": args.base_epochs,
        "dir": os.path.relpath(out, ROOT),
        "holdout_top1": round(100 * metrics["final"]["accuracy_dense"], 2),
        "wall_time_s": metrics.get("wall_time_s"),
    }


def _row_keys(args: argparse.Namespace, name: str, spec: dict[str, Any]) -> set[tuple]:
    """Keys ``(run, split, sparsity, variant)`` of every row measured on the run ``name`` (eval_jobs' rows)."""
    if spec["contender"] == "gmp":
        cells = [(spec["sparsity"], v) for v in ("zero", "bn_recal")]
    else:
        cells = [(s, v) for s in args.sparsities for v in args.variants] + [(0.0, "dense")]
    runs = [name]
    if spec["contender"] == "plain":  # the one-shot methods run on the plain fine-tuned models
        runs += [f"{m}{suffix}-s{spec['seed']}" for m in ONE_SHOT if m in args.contenders for suffix in ("", "_global")]
        runs += [f"plain_{scope}-s{spec['seed']}" for c, scope in SCOPED_MAGNITUDE.items() if c in args.contenders]
    return {(run, split, s, v) for run in runs for split in ("test", "val") for s, v in cells}


def measured_rows(args: argparse.Namespace) -> dict[tuple, dict[str, Any]]:
    """The rows in the results so far, by ``(run, split, sparsity, variant)`` (none with ``--retrain``)."""
    path = Path(args.results) / "cifar10_v2.json"
    if args.retrain or not path.exists():
        return {}
    return {(r["run"], r["split"], r["sparsity"], r["variant"]): r for r in json.loads(path.read_text())["rows"]}


def measured_runs(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> set[str]:
    """Runs whose rows are all in the results already: no need to train them again (their folders are git-ignored
    and gone in a new checkout; the rows are committed)."""
    index = measured_rows(args)
    return {name for name, spec in specs.items() if index and _row_keys(args, name, spec) <= index.keys()}


def train_finetunes(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> None:
    base = os.path.join(args.workdir, "base")
    measured = measured_runs(args, specs)
    jobs = []
    for name, spec in specs.items():
        out = os.path.join(args.workdir, name)
        if not args.retrain and (_finished(out) or name in measured):
            continue
        os.makedirs(out, exist_ok=True)
        flags = {
            **_recipe_flags(args, spec["seed"]),
            "model": f"local-dir:{base}",
            "pretrained": True,
            "epochs": args.finetune_epochs,
            "lr": args.finetune_lr,
            "warmup_epochs": 0,
            # Hold out what the base held out (it trained with seed 0): with the run's own seed the validation
            # images would be mostly images the base trained on.
            "split_seed": 0 if args.finetune_split == "base" else spec["seed"],
            **{k: v for k, v in spec.items() if k not in ("contender", "seed")},
        }
        jobs.append(_job(flags, out, args))
    print(f"[finetune] {len(specs) - len(jobs)} runs reused, {len(jobs)} to train", flush=True)
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
        for log_path, took in pool.map(train_one, jobs):
            print(f"[finetune] {Path(log_path).parent.name}: {took / 60:.1f} min", flush=True)


# ---------------------------------------------------------------------------------------------- evaluation
def eval_jobs(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> list[tuple[dict[str, Any], EvalJob]]:
    """(row labels, job) for every evaluation: finished fine-tuned runs, the base, and the one-shot methods."""
    methods = set(timm_prune.list_methods())
    out = []
    for split in ("test", "val"):
        limit = args.max_eval_samples if split == "test" else args.val_samples
        data = DataSpec(args.data, args.img_size, args.validation_fraction, 0, args.batch_size, limit)
        common = {"model": args.model, "model_kwargs": args.model_kwargs, "split": split, "data": data}
        common.update(bn_batches=args.bn_batches, threads=args.threads, bf16=args.bf16)

        def job(run: str, run_dir: str, method: str, options: dict, sparsities: list, variants: list, common=common):
            scopes = [options.pop("scope", "global")]
            # A base restored from --base_cache has its saved (dense) model but no epoch checkpoints.
            weights = "checkpoint" if os.path.isdir(os.path.join(run_dir, "checkpoints")) else "saved"
            return EvalJob(run, run_dir, method=method, options=options, scopes=scopes, sparsities=sparsities,
                           variants=variants, weights=weights, **common)  # fmt: skip

        base_dir = os.path.join(args.workdir, "base")
        if "base" in args.contenders and _finished(base_dir):
            labels = {"contender": "base", "seed": None}
            out.append((labels, job("base", base_dir, "magnitude", {}, args.sparsities, args.variants)))
        scoped = [scope for contender, scope in SCOPED_MAGNITUDE.items() if contender in args.contenders]
        for scope in scoped if _finished(base_dir) else []:
            labels = {"contender": f"base_{scope}", "seed": None}
            out.append((labels, job(f"base_{scope}", base_dir, "magnitude", {"scope": scope}, args.sparsities,
                                    args.variants)))  # fmt: skip
        for name, spec in specs.items():
            run_dir = os.path.join(args.workdir, name)
            if not _finished(run_dir):
                continue
            labels = {"contender": spec["contender"], "seed": spec["seed"]}
            options = {k: v for k, v in spec.items() if k not in ("contender", "seed", "method", "sparsity")}
            if spec["contender"] == "gmp":
                out.append((labels, job(name, run_dir, "gmp", options, [spec["sparsity"]], ["zero", "bn_recal"])))
            elif spec["method"] == "pof":
                out.append((labels, job(name, run_dir, "pof", options, args.sparsities, args.variants)))
            else:
                out.append((labels, job(name, run_dir, "magnitude", {}, args.sparsities, args.variants)))
            for scope in scoped if spec["contender"] == "plain" else []:
                scoped_labels = {"contender": f"plain_{scope}", "seed": spec["seed"]}
                scoped_job = job(f"plain_{scope}-s{spec['seed']}", run_dir, "magnitude", {"scope": scope},
                                 args.sparsities, args.variants)  # fmt: skip
                out.append((scoped_labels, scoped_job))
        # One-shot methods on the plain fine-tuned models (same budget) and on the base (no training at all).
        for method in ONE_SHOT:
            if method not in args.contenders:
                continue
            if method not in methods:
                print(f"[eval] {method}: not registered in timm_prune yet; skipped", flush=True)
                continue
            # Per layer as published, and with one global threshold over the scores (the fair match for global
            # magnitude): contenders "wanda" and "wanda_global", and "..._base" for the base.
            for scope, suffix in (("layer", ""), ("global", "_global")):
                options = {"scope": scope, "calibration_batches": ONE_SHOT_BATCHES[method]}
                contender = f"{method}{suffix}"
                sources = [(f"{contender}_base", None, base_dir)]
                sources += [(f"{contender}-s{s['seed']}", s["seed"], os.path.join(args.workdir, n))
                            for n, s in specs.items() if s["contender"] == "plain"]  # fmt: skip
                for run, seed, run_dir in sources:
                    if _finished(run_dir):
                        labels = {"contender": contender if seed is not None else f"{contender}_base", "seed": seed}
                        out.append((labels, job(run, run_dir, method, dict(options), args.sparsities, args.variants)))
    return out


def reuse_rows(args: argparse.Namespace, jobs: list[tuple[dict, EvalJob]]) -> tuple[list[dict], list[tuple]]:
    index = measured_rows(args)
    if not index:
        return [], jobs
    reused, todo, covered = [], [], set()
    for labels, job in jobs:
        keys = [(job.run, job.split, s, v) for s in job.sparsities for v in job.variants]
        if labels["contender"] != "gmp":  # a GMP model has no dense row (_label_rows)
            keys.append((job.run, job.split, 0.0, "dense"))
        covered.update(keys)
        if all(key in index for key in keys):
            reused.extend(index[key] for key in keys)
        else:
            todo.append((labels, job))
    # Rows this invocation does not measure (other contenders, other sparsities) are kept as they are.
    reused.extend(row for key, row in index.items() if key not in covered)
    print(f"[eval] reusing {len(reused)} rows; {len(todo)} evaluation jobs to run", flush=True)
    return reused, todo


def _label_rows(labels: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    out = []
    for row in rows:
        out.append({**labels, **row})
    # One dense row per model and split: its accuracy before pruning (a GMP model is never dense).
    if rows and labels["contender"] != "gmp":
        first = rows[0]
        out.append({**labels, **first, "sparsity": 0.0, "measured_sparsity": 0.0, "variant": "dense"})
        out[-1]["top1"] = first["dense_top1"]
    return out


# ---------------------------------------------------------------------------------------------- cost
def cost(args: argparse.Namespace) -> dict[str, Any]:
    """Per-step time of POF and GMP against plain training on identical batches, interleaved in one process."""
    torch.set_num_threads(args.threads)
    model = create_model(args.model, args.model_kwargs)
    data = DataSpec(args.data, args.img_size, args.validation_fraction, 0, args.batch_size, 2 * args.batch_size)
    _, (images, labels) = load_eval_tensors(data, model, "val")
    batch = images[: args.batch_size], labels[: args.batch_size]
    out = {}
    pof = {k: v for k, v in pof_options(args).items()}
    gmp = {"sparsity": 0.9, "update_every": 10}
    # The precision the runs train in: bf16 pays only on CPUs with AMX; without, fp32 is the faster one.
    precision = "bf16" if args.bf16 else "fp32"

    def ratio(options: dict[str, Any], method: str = "pof") -> dict[str, float]:
        return step_time_ratio(args.model, args.model_kwargs, *batch, options, 30, method=method, bf16=args.bf16)

    out[f"pof_{precision}"] = ratio({"sparsity": 0.9, **pof})
    for name, options in args.pof_variants.items():
        out[f"{name}_{precision}"] = ratio({"sparsity": 0.9, **pof, **options})
    out[f"gmp_{precision}"] = ratio(gmp, method="gmp")
    for name, row in out.items():
        print(f"[cost] step time {name} / plain: median x{row['step_time_ratio']:.3f}", flush=True)
    return out


def run_walltimes(args: argparse.Namespace, specs: dict[str, dict[str, Any]]) -> list[dict[str, Any]]:
    rows = []
    for name, spec in specs.items():
        path = Path(args.workdir, name, "metrics.json")
        if path.exists():
            metrics = json.loads(path.read_text())
            rows.append({"run": name, "contender": spec["contender"], "seed": spec["seed"], **_times(metrics)})
    return rows


def _times(metrics: dict[str, Any]) -> dict[str, Any]:
    return {"wall_time_s": metrics.get("wall_time_s"), "holdout_dense": metrics["final"].get("accuracy_dense")}


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    specs = finetune_specs(args)
    path = Path(args.results) / "cifar10_v2.json"
    results: dict[str, Any] = json.loads(path.read_text()) if path.exists() and not args.retrain else {}
    results.update(
        dataset="cifar10",
        finetune_epochs=args.finetune_epochs,
        finetune_lr=args.finetune_lr,
        img_size=args.img_size,
        # Every sparsity and seed measured so far: an invocation that adds some (--sparsities 0.95 0.98) must not
        # shrink the report's columns to its own.
        sparsities=sorted({*results.get("sparsities", []), *args.sparsities}),
        seeds=sorted({*results.get("seeds", []), *args.seeds}),
        bf16=args.bf16,
        jobs=args.jobs,
        pof_options=pof_options(args),
        # Every variant measured so far (a later invocation may name only some): the report lists their options.
        pof_variants={**results.get("pof_variants", {}), **args.pof_variants},
    )
    if "gmp" in args.contenders and not args.report_only:  # one GMP scope per results file: the report names it
        results["gmp_scope"] = args.gmp_scope
    if not args.report_only:  # the commands that measured rows, not the ones that re-wrote the report
        command = "python bench/cifar10_v2.py " + " ".join(argv if argv is not None else sys.argv[1:])
        commands = results.get("commands", [results["command"]] if "command" in results else [])
        results["commands"] = [c for c in commands if c != command] + [command]
        results["command"] = command
    if not args.report_only:
        results["base"] = train_base(args)
        train_finetunes(args, specs)
        jobs = eval_jobs(args, specs)
        rows, todo = reuse_rows(args, jobs)
        labels = [lab for lab, _ in todo]
        with ProcessPoolExecutor(max_workers=args.jobs, mp_context=get_context("spawn")) as pool:
            for lab, part in zip(labels, pool.map(run_eval_job, [job for _, job in todo]), strict=True):
                rows.extend(_label_rows(lab, part))
                results["rows"] = rows
                atomic_write_text(path, json.dumps(results, indent=2, default=str) + "\n")  # partial results
        results["rows"] = rows
        # Wall times of runs trained by earlier invocations (their folders may be gone) are kept.
        times = {r["run"]: r for r in results.get("run_times", [])}
        times.update({r["run"]: r for r in run_walltimes(args, specs)})
        results["run_times"] = list(times.values())
        if "cost" not in results or args.retrain:
            results["cost"] = cost(args)
    if args.cost_only:
        results["cost"] = cost(args)
    results["wall_time_min"] = round((time.time() - started) / 60, 1)
    write_results(results, Path(args.results))
    print(f"done in {results['wall_time_min']} min; results in {args.results}")


if __name__ == "__main__":
    main()
