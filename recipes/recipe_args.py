"""Command-line and YAML arguments of ``recipes/train.py``.

Every flag can also be set from a YAML recipe (``--config recipes/configs/NAME.yaml``) under the same
underscore-style key; the command line wins. Pruning-method fields are not listed here: they are read from
each registered method's options dataclass, so a new method's fields become flags (and YAML keys) with no
change to the recipe.
"""

from __future__ import annotations

import argparse
import dataclasses
import difflib
import os
import typing
from collections.abc import Sequence
from typing import Any

import yaml

import timm_prune
from timm_prune.config import RECOVERIES, SCOPES, default_scope
from timm_prune.data import DATASET_PRESETS
from timm_prune.methods import get_method

# Recipe defaults per method, for flags left unset (PruneConfig's own defaults apply otherwise). POF's
# candidate set moves slowly, so re-selecting it every 10 steps (a per-layer k-th value, the penalty's main
# CPU cost) instead of every step saves time.
METHOD_RECIPE_DEFAULTS: dict[str, dict[str, Any]] = {"pof": {"threshold_refresh": 10}}

# PruneConfig fields shared by all methods, with their flags below.
SHARED_PRUNE_FIELDS = (
    "method",
    "sparsity",
    "scope",
    "target_modules",
    "exclude_modules",
    "penalty_weight",
    "recovery",
    "pattern",
)


def str2bool(value: str | bool) -> bool:
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "y", "on"):
        return True
    if lowered in ("0", "false", "no", "n", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean (true/false); got {value!r}")


def yaml_value(text: str) -> Any:
    """Parse a flag value as YAML: ``1e-3`` -> float, ``[a, b]`` -> list, ``{img_size: 32}`` -> dict."""
    value = yaml.safe_load(text)
    # YAML 1.1 reads "1e-3" (no dot) as a string; numbers are what such text means here.
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            return value
    return value


def _dict_value(text: str) -> dict:
    value = yaml.safe_load(text) if isinstance(text, str) else text
    if value is None:
        return {}
    if not isinstance(value, dict):
        raise argparse.ArgumentTypeError(f"expected a YAML/JSON mapping such as '{{img_size: 32}}'; got {text!r}")
    return value


def _method_field_type(hint: Any) -> Any:
    """The argparse ``type`` for a method option annotated ``hint`` (YAML parsing for anything composite)."""
    if hint is bool:
        return str2bool
    if hint in (int, float, str):
        return hint
    return yaml_value


def method_fields() -> dict[str, tuple[Any, list[str], Any]]:
    """Fields of every registered method: name -> (argparse type, methods declaring it, first default)."""
    fields: dict[str, tuple[Any, list[str], Any]] = {}
    for method in timm_prune.list_methods():
        options_cls = get_method(method).options_cls
        try:
            hints = typing.get_type_hints(options_cls)
        except Exception:  # unresolvable annotations: fall back to YAML parsing of the value
            hints = {}
        for f in dataclasses.fields(options_cls):
            default = f.default if f.default is not dataclasses.MISSING else None
            if f.name in fields:
                fields[f.name][1].append(method)
            else:
                fields[f.name] = (_method_field_type(hints.get(f.name)), [method], default)
    return fields


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description="Train a timm model with a pruning-friendly penalty, prune it without fine-tuning, evaluate "
        "dense / pruned / recovered / BN-recalibrated accuracy, and save it (save_pretrained).",
        allow_abbrev=False,  # YAML keys and flags must match exactly; no prefix guessing
    )
    p.add_argument("--config", type=str, default=None, help="YAML recipe; its keys are these flags' names")
    g = p.add_argument_group("model")
    g.add_argument("--model", type=str, default="resnet10t", help="timm model name, or hf-hub:/local-dir: id")
    g.add_argument("--pretrained", type=str2bool, nargs="?", const=True, default=False, help="load timm weights")
    g.add_argument("--num_classes", type=int, default=None, help="default: inferred from the dataset")
    g.add_argument("--model_kwargs", type=_dict_value, default={}, help="extra create_model kwargs, YAML mapping")
    g.add_argument("--img_size", type=int, default=None, help="input resolution (default: the model's)")
    g.add_argument("--crop_pct", type=float, default=None, help="eval centre-crop fraction (default: model's)")
    g = p.add_argument_group("data")
    g.add_argument("--dataset", type=str, default="digits", help="Hub id, local parquet/imagefolder dir, 'digits'")
    g.add_argument("--image_column", type=str, default=None, help="default: detected")
    g.add_argument("--label_column", type=str, default=None, help="default: detected")
    g.add_argument("--validation_fraction", type=float, default=0.2, help="hold-out when there is no val split")
    g.add_argument(
        "--validation_split", type=str, default=None, help="split to validate on, or 'holdout' (default: detected)"
    )
    g.add_argument(
        "--split_seed",
        type=int,
        default=None,
        help="seed of the hold-out split (default: --seed). Fine-tuning a trained model: give the seed its own "
        "training held out with, or the new hold-out is mostly images it trained on",
    )
    g.add_argument("--max_train_samples", type=int, default=None)
    g.add_argument("--max_eval_samples", type=int, default=None)
    g.add_argument("--num_workers", type=int, default=min(2, os.cpu_count() or 1), help="DataLoader workers")
    g.add_argument("--augment", choices=("timm", "none"), default="timm", help="timm training transform, or none")
    g.add_argument("--hflip", type=float, default=None, help="horizontal flip probability (timm default 0.5)")
    g.add_argument("--scale", type=float, nargs=2, default=None, help="RandomResizedCrop scale range")
    g.add_argument("--color_jitter", type=float, default=None, help="ColorJitter strength (timm default 0.4)")
    g.add_argument(
        "--data_pipeline",
        choices=("auto", "tensor", "pil"),
        default="auto",
        help="tensor: decode once, augment whole batches (fast, for in-memory datasets); pil: timm's per-image "
        "transforms; auto: tensor when the decoded train split fits in --tensor_pipeline_max_gb",
    )
    g.add_argument("--tensor_pipeline_max_gb", type=float, default=4.0, help=argparse.SUPPRESS)
    g = p.add_argument_group("pruning (method fields of every registered method are flags too)")
    g.add_argument("--method", type=str, default="pof", help=f"one of {timm_prune.list_methods()}")
    g.add_argument(
        "--sparsity", type=float, default=None, help="fraction of targeted weights removed, in [0, 1) (default 0.7)"
    )
    g.add_argument(
        "--scope", type=str, default=None, help=f"one of {list(SCOPES)} (default: the method's; pof, magnitude: lamp)"
    )
    g.add_argument("--target_modules", type=str, nargs="+", default=None, help="one regex, or names/suffixes")
    g.add_argument("--exclude_modules", type=str, nargs="+", default=None, help="one regex, or names/suffixes")
    g.add_argument("--penalty_weight", type=float, default=None, help="default: the method's (pof 300, slr 1)")
    g.add_argument("--recovery", type=str, default="mean", help=f"one of {list(RECOVERIES)}")
    g.add_argument(
        "--pattern",
        type=str,
        default=None,
        help="N:M semi-structured sparsity, e.g. 2:4 (sets the sparsity to 1 - N/M)",
    )
    g.add_argument("--bn_batches", type=int, default=10, help="batches for the BatchNorm re-estimation row")
    for name, (ftype, methods, default) in method_fields().items():
        if name in SHARED_PRUNE_FIELDS or any(a.dest == name for a in p._actions):
            raise RuntimeError(f"method field {name!r} of {methods} clashes with a recipe flag; rename it")
        g.add_argument(f"--{name}", type=ftype, default=None, help=f"{'/'.join(methods)} field (default {default!r})")
    g = p.add_argument_group("training")
    g.add_argument("--epochs", type=int, default=10, help="0: no training (calibrate if the method needs it, prune)")
    g.add_argument("--max_train_steps", type=int, default=None, help="optimizer steps; overrides --epochs")
    g.add_argument("--batch_size", type=int, default=64, help="per process")
    g.add_argument("--eval_batch_size", type=int, default=None, help="default: 2 x --batch_size")
    g.add_argument("--opt", type=str, default="sgd", help="timm.optim.create_optimizer_v2 name (sgd, adamw, ...)")
    g.add_argument("--lr", type=float, default=0.05)
    g.add_argument("--weight_decay", type=float, default=5e-4)
    g.add_argument("--momentum", type=float, default=0.9)
    g.add_argument("--sched", type=str, default="cosine", help="timm.scheduler.create_scheduler_v2 name")
    g.add_argument("--warmup_epochs", type=int, default=0)
    g.add_argument("--min_lr", type=float, default=0.0)
    g.add_argument("--gradient_accumulation_steps", type=int, default=1)
    g.add_argument("--seed", type=int, default=42)
    g.add_argument(
        "--channels_last", type=str2bool, nargs="?", const=True, default=False, help="channels-last memory format"
    )
    g.add_argument("--cpu", type=str2bool, nargs="?", const=True, default=False, help="force CPU")
    g = p.add_argument_group("checkpoints, logs, outputs")
    g.add_argument(
        "--output_dir",
        type=str,
        default=None,
        help="default: runs/<dataset>-<model>-<method>-<sparsity %% | flops<%%> | NofM> from the settings used",
    )
    g.add_argument(
        "--overwrite_output_dir",
        type=str2bool,
        nargs="?",
        const=True,
        default=False,
        help="write into a non-empty --output_dir (its old logs/metrics.jsonl and checkpoints/ are removed); "
        "without it such a folder is refused unless --resume_from_checkpoint continues its run",
    )
    g.add_argument("--checkpointing_steps", type=str, default=None, help="an integer N (every N steps) or 'epoch'")
    g.add_argument(
        "--checkpoints_total_limit", type=int, default=None, help="keep only the newest N checkpoints (default: all)"
    )
    g.add_argument("--resume_from_checkpoint", type=str, default=None, help="a checkpoint dir, or 'latest'")
    g.add_argument("--report_to", type=str, default="tensorboard,jsonl", help="tensorboard, jsonl, all or none")
    g.add_argument("--push_to_hub", type=str2bool, nargs="?", const=True, default=False)
    g.add_argument("--hub_model_id", type=str, default=None, help="default: the output dir's name")
    g.add_argument("--hub_private", type=str2bool, nargs="?", const=True, default=False)
    # Tests: simulate an interruption right after the checkpoint at this optimizer step.
    g.add_argument("--stop_after_step", type=int, default=None, help=argparse.SUPPRESS)
    return p


def _apply_yaml(parser: argparse.ArgumentParser, path: str) -> None:
    if not os.path.isfile(path):
        raise ValueError(f"--config {path!r}: no such file")
    with open(path) as f:
        values = yaml.safe_load(f) or {}
    if not isinstance(values, dict):
        raise ValueError(f"--config {path!r} must be a YAML mapping of flag names to values")
    actions = {a.dest: a for a in parser._actions if a.dest not in ("help", "config")}
    unknown = sorted(set(values) - set(actions))
    if unknown:
        hints = {k: difflib.get_close_matches(k, list(actions), n=1) for k in unknown}
        raise ValueError(f"--config {path!r}: unknown key(s) {unknown} (closest flags: {hints})")
    for key, value in values.items():
        convert = actions[key].type
        # argparse only converts string defaults; do the same so YAML and flags yield the same types.
        if isinstance(value, str) and convert is not None:
            value = convert(value)
        elif convert is float and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)  # `lr: 1` in YAML means 1.0
        values[key] = value
    parser.set_defaults(**values)


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = build_parser()
    known, _ = parser.parse_known_args(argv)
    if known.config is not None:
        try:
            _apply_yaml(parser, known.config)
        except (ValueError, argparse.ArgumentTypeError) as e:
            parser.error(str(e))
    args = parser.parse_args(argv)
    if args.sparsity is None:  # an N:M pattern fixes the sparsity at 1 - N/M (PruneConfig checks the pattern)
        nm = args.pattern and args.pattern.split(":")
        args.sparsity = 1 - int(nm[0]) / int(nm[1]) if nm and len(nm) == 2 and all(p.isdigit() for p in nm) else 0.7
    # Presets fill only what neither the command line nor the YAML set (those flags default to None).
    for preset in (DATASET_PRESETS.get(args.dataset, {}), METHOD_RECIPE_DEFAULTS.get(args.method, {})):
        for key, value in preset.items():
            if getattr(args, key, None) is None:
                setattr(args, key, value)
    if args.scope is None and args.method in timm_prune.list_methods():
        # Written out, as PruneConfig resolves it, so that the run's saved arguments name the scope used.
        args.scope = default_scope(args.method, args.pattern)
    if args.output_dir is None:
        args.output_dir = default_output_dir(args)
    if args.checkpoints_total_limit is not None and args.checkpoints_total_limit < 1:
        parser.error(f"--checkpoints_total_limit must be >= 1; got {args.checkpoints_total_limit}")
    if args.checkpointing_steps is not None and args.checkpointing_steps != "epoch":
        if not args.checkpointing_steps.isdigit() or int(args.checkpointing_steps) < 1:
            parser.error(f"--checkpointing_steps must be a positive integer or 'epoch'; got {args.checkpointing_steps}")
    for flag in ("batch_size", "gradient_accumulation_steps", "bn_batches"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag} must be >= 1; got {getattr(args, flag)}")
    if args.epochs < 0:
        parser.error(f"--epochs must be >= 0 (0: no training); got {args.epochs}")
    return args


def default_output_dir(args: argparse.Namespace) -> str:
    """``runs/<dataset>-<model>-<method>-<goal>``, the goal being what the run actually prunes to: the FLOPs
    target of a structured method that has one (``flops50``), an N:M pattern (``2of4``), else the sparsity in
    percent (``70``, ``87.5``), with the method's own defaults filled in."""
    dataset = os.path.basename(os.path.normpath(args.dataset)) or "data"
    model = args.model.split(":")[-1].replace("/", "_")
    try:
        config = prune_config_from_args(args)
    except (ValueError, TypeError):  # reported with the other argument errors, before anything is written
        config = None
    flops_target = getattr(config, "flops_target", None) if config is not None else None
    sparsity = config.sparsity if config is not None and config.sparsity is not None else args.sparsity
    if flops_target is not None:
        goal = f"flops{100 * flops_target:g}" if flops_target < 1 else f"{flops_target:g}mflops"
    elif args.pattern:
        goal = args.pattern.replace(":", "of")
    else:
        goal = f"{100 * sparsity:.4g}"
    return os.path.join("runs", f"{dataset}-{model}-{args.method}-{goal}")


def prune_config_from_args(args: argparse.Namespace) -> timm_prune.PruneConfig:
    """The PruneConfig the flags describe; raises ``ValueError`` naming a bad field (PruneConfig validates).

    Only fields that were set are passed for method options, so the method's own defaults apply otherwise; a
    field set for a method that does not declare it is an error (PruneConfig names it).
    """
    shared: dict[str, Any] = {name: getattr(args, name) for name in SHARED_PRUNE_FIELDS}
    if shared["penalty_weight"] is None:
        del shared["penalty_weight"]
    for name in ("target_modules", "exclude_modules"):
        value = shared[name]
        # One value on the command line is a regex (PEFT's str form); several are names / suffixes.
        if isinstance(value, list) and len(value) == 1:
            shared[name] = value[0]
    options = {name: getattr(args, name) for name in method_fields() if getattr(args, name) is not None}
    return timm_prune.PruneConfig(**shared, **options)
