"""``timm-prune``: inspect, evaluate and publish saved pruned models.

    timm-prune info  MODEL [--revision R] [--json]
    timm-prune eval  MODEL --dataset digits|DIR|HUB_ID [--split test] [--recovery KIND ...] [--limit N] [--json]
    timm-prune push  DIR REPO_ID [--private] [--revision R] [--commit-message M]
    timm-prune prune MODEL --method wanda|sparsegpt|magnitude --sparsity S [--pattern N:M] --dataset D --output DIR

MODEL is a directory written by ``save_pretrained`` or a Hub id (``user/name``, ``hf-hub:user/name@rev``).
``--dataset digits`` is scikit-learn's 8x8 handwritten digits (10 classes, offline), upscaled and
replicated to the model's input; anything else goes to ``datasets.load_dataset`` (a local parquet or
image folder, or a Hub dataset id).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any

import timm
import torch
from tqdm.auto import tqdm

from .config import RECOVERY_KINDS, PruneConfig
from .data import eval_loader, load_eval_tensors
from .hub import FileFormatError, HubUnreachableError, push_folder, read_pruning_info
from .hub.card import default_recovery
from .hub.files import PRUNING_CONFIG_NAME
from .model import convert, from_pretrained
from .registry import get_method


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except (FileFormatError, HubUnreachableError, FileNotFoundError, ValueError, OSError, RuntimeError) as e:
        print(f"timm-prune {args.command}: error: {e}", file=sys.stderr)
        return 1


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="timm-prune", description="Inspect, evaluate and publish pruned timm models.")
    sub = parser.add_subparsers(dest="command", required=True)

    info = sub.add_parser("info", help="summary of a saved model: method, sparsity, per-layer table")
    info.add_argument("model", help="directory written by save_pretrained, or a Hub id")
    info.add_argument("--revision", default=None)
    info.add_argument("--json", action="store_true", help="print pruning_config.json as JSON")
    info.set_defaults(func=_info)

    ev = sub.add_parser("eval", help="top-1 accuracy on a dataset, without and with recovery")
    ev.add_argument("model", help="directory written by save_pretrained, or a Hub id")
    ev.add_argument("--dataset", required=True, help="'digits', a local parquet/image folder, or a Hub dataset id")
    ev.add_argument("--split", default="test")
    ev.add_argument("--revision", default=None)
    ev.add_argument(
        "--recovery",
        nargs="+",
        choices=("none",) + RECOVERY_KINDS,
        default=None,
        help="recoveries to evaluate (default: none and the model's default recovery)",
    )
    ev.add_argument(
        "--limit", type=int, default=None, help="evaluate a seeded random sample of N examples, stratified by label"
    )
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--image-size", type=int, default=None, help="input side (default: the model's)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.set_defaults(func=_eval)

    pr = sub.add_parser("prune", help="prune a timm model with no training (one-shot) and save it")
    pr.add_argument("model", help="timm model name, 'hf-hub:user/name', or a local directory (timm or timm_prune save)")
    pr.add_argument("--method", required=True, help="an unstructured method, e.g. sparsegpt, wanda, magnitude")
    pr.add_argument("--sparsity", type=float, default=None, help="fraction of targeted weights removed (default 0.5)")
    pr.add_argument("--pattern", default=None, help="N:M semi-structured sparsity, e.g. 2:4")
    pr.add_argument(
        "--scope", default=None, help="'layer', 'global' or 'lamp' (default: the method's; lamp for magnitude)"
    )
    pr.add_argument("--recovery", default="mean", help="data-free recovery saved as the model's default")
    pr.add_argument(
        "--dataset", default=None, help="calibration images: 'digits', a local parquet/image folder, a Hub id"
    )
    pr.add_argument("--split", default="train", help="dataset split the calibration images come from")
    pr.add_argument("--calibration-batches", type=int, default=None, help="batches of --batch-size (method default 8)")
    pr.add_argument("--batch-size", type=int, default=16)
    pr.add_argument("--image-size", type=int, default=None, help="input side (default: the model's)")
    pr.add_argument("--bn-batches", type=int, default=0, help="re-estimate BatchNorm on N calibration batches")
    pr.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="another PruneConfig field")
    pr.add_argument("--no-pretrained", action="store_true", help="a timm name: random weights (for testing)")
    pr.add_argument("--output", required=True, help="directory to save_pretrained into")
    pr.add_argument("--overwrite", action="store_true", help="allow a non-empty --output directory")
    pr.set_defaults(func=_prune)

    push = sub.add_parser("push", help="upload a directory written by save_pretrained to a Hub repo, in one commit")
    push.add_argument("directory")
    push.add_argument("repo_id")
    push.add_argument("--private", action="store_true")
    push.add_argument("--revision", default=None, help="branch to commit to (created if missing)")
    push.add_argument("--commit-message", default=None)
    push.add_argument("--token", default=None, help="Hub token (default: the logged-in one / HF_TOKEN)")
    push.set_defaults(func=_push)
    return parser


# ------------------------------------------------------------------------------------------------ info
def _info(args: argparse.Namespace) -> int:
    pruning, timm_config, where = read_pruning_info(args.model, revision=args.revision)
    if args.json:
        print(json.dumps(pruning, indent=2))
        return 0
    config, report = pruning["config"], pruning.get("report")
    method_fields = {k: v for k, v in config.items() if k not in ("method", "sparsity", "scope", "recovery")}
    print(f"model:         {where}")
    print(f"architecture:  {timm_config['architecture']} ({timm_config['num_classes']} classes)")
    print(f"base model:    {pruning.get('base_model') or '-'}")
    print(f"method:        {config['method']} ({', '.join(f'{k}={v}' for k, v in method_fields.items())})")
    structured = bool(report) and report.get("kind") == "structured"
    if structured:
        print(
            f"structured:    FLOPs {report['flops_after'] / 1e6:.2f}M of {report['flops_before'] / 1e6:.2f}M "
            f"({report['flops_after'] / max(report['flops_before'], 1):.2%}) at input {report['input_size']}, "
            f"params {report['params_before']:,} -> {report['params_after']:,}"
        )
    elif report:
        print(
            f"sparsity:      {report['sparsity']:.2%} of {report['numel']:,} targeted weights "
            f"(target {report['target_sparsity']:.2%}, scope {report['scope']})"
        )
    else:
        print("sparsity:      not pruned")
    print(f"recovery:      {pruning.get('recovery', 'none')} when saved; default on load: {default_recovery(pruning)}")
    print(f"               available: {', '.join(pruning.get('recovery_kinds') or ['none'])}")
    print(
        f"format:        {pruning['save_format']} ({pruning['weights_file']}), timm_prune {pruning['library_version']}"
    )
    for key, value in sorted((pruning.get("metrics") or {}).items()):
        if isinstance(value, (int, float, str)):
            print(f"metric:        {key} = {value}")
    if structured:
        groups = report.get("groups") or []
        if groups:
            print()
            width = max(len(str(group["root"])) for group in groups)
            print(f"{'channel group (root layer)':<{width}}  {'kept':>6} / channels")
            for group in groups:
                print(f"{group['root']:<{width}}  {group['kept']:>6} / {group['channels']}")
    elif report:
        print()
        width = max(len(row["name"]) for row in report["layers"])
        print(f"{'layer':<{width}}  {'type':<8} {'shape':<20} {'sparsity':>8}")
        for row in report["layers"]:
            print(f"{row['name']:<{width}}  {row['type']:<8} {str(row['shape']):<20} {row['sparsity']:>8.2%}")
    return 0


def _pruned_summary(pm: Any) -> str:
    report = pm.last_report
    if report is None:
        return "not pruned"
    if getattr(report, "kind", None) == "structured":
        return f"structured, {report.flops_ratio:.2%} of the FLOPs"
    return f"{report.sparsity:.2%} sparse"


# ------------------------------------------------------------------------------------------------ eval
def _eval(args: argparse.Namespace) -> int:
    pm = from_pretrained(args.model, recover=True, revision=args.revision)  # pm.recovery: the model's default
    kinds = args.recovery or list(dict.fromkeys(["none", pm.recovery]))
    if not pm.is_pruned and set(kinds) != {"none"}:
        raise ValueError(f"{args.model} was saved unpruned: only --recovery none applies")
    size = args.image_size or _model_image_size(pm.model)
    cfg = pm.model.pretrained_cfg
    mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
    in_chans = getattr(pm.model, "in_chans", None) or cfg.get("input_size", (3,))[0]
    # Streamed: one batch decoded at a time (a whole split at 224 px does not fit in memory), every recovery
    # scored on each batch; --limit is a seeded, label-stratified sample.
    loader, name = eval_loader(args.dataset, args.split, size, in_chans, mean, std, args.limit, args.batch_size)
    correct, total = dict.fromkeys(kinds, 0), 0
    pm.eval()
    with torch.no_grad(), tqdm(total=len(loader.dataset), desc="eval", unit="img", file=sys.stderr) as bar:
        for images, labels in loader:
            for kind in kinds:
                if len(kinds) > 1 or pm.recovery != kind:
                    pm.recover(kind)
                correct[kind] += int((pm(images).argmax(-1) == labels).sum())
            total += len(labels)
            bar.update(len(labels))
    results = [
        {"recovery": kind, "accuracy": correct[kind] / max(total, 1), "correct": correct[kind], "total": total}
        for kind in kinds
    ]
    if args.json:
        print(json.dumps({"model": args.model, "dataset": name, "split": args.split, "results": results}, indent=2))
        return 0
    sparsity = _pruned_summary(pm)
    print(f"model:    {args.model} ({pm.model.pretrained_cfg.get('architecture')}, {pm.config.method}, {sparsity})")
    sample = f" (a seeded sample, stratified by label, of --limit {args.limit})" if args.limit else ""
    print(f"dataset:  {name} [{args.split}]: {total} images at {size}x{size}{sample}")
    print(f"{'recovery':<12} {'accuracy':>9} {'correct':>12}")
    for row in results:
        print(f"{row['recovery']:<12} {row['accuracy']:>9.2%} {row['correct']:>6}/{row['total']}")
    return 0


def _model_image_size(model: torch.nn.Module) -> int:
    traits = getattr(model, "_traits", {}) or {}  # timm records the img_size a model was built with
    if traits.get("img_size"):
        return int(traits["img_size"][-1])
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


# ------------------------------------------------------------------------------------------------ prune
def _prune_config(args: argparse.Namespace) -> PruneConfig:
    options: dict[str, Any] = {}
    for item in args.option:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ValueError(f"--option {item!r}: expected KEY=VALUE")
        options[key.strip()] = json.loads(value) if _is_json(value) else value
    if args.calibration_batches is not None:
        options["calibration_batches"] = args.calibration_batches
    shared = {"sparsity": args.sparsity, "pattern": args.pattern, "scope": args.scope, "recovery": args.recovery}
    config = PruneConfig(method=args.method, **shared, **options)
    if get_method(args.method).structured:
        raise ValueError(f"--method {args.method!r} removes channels; `prune` runs unstructured methods only")
    return config


def _is_json(text: str) -> bool:
    try:
        json.loads(text)
    except ValueError:
        return False
    return True


def _load_for_pruning(name: str, pretrained: bool) -> tuple[torch.nn.Module, str]:
    """The plain timm model to prune and the id it came from (a timm_prune save is merged back to plain first)."""
    path = name[len("local-dir:") :] if name.startswith("local-dir:") else name
    if os.path.isdir(path):
        if os.path.isfile(os.path.join(path, PRUNING_CONFIG_NAME)):
            saved = from_pretrained(path, recover=False)
            return saved.merge_and_unload(), saved.base_model or path
        if not os.path.isfile(os.path.join(path, "config.json")):
            raise ValueError(f"{path!r} is a directory without config.json: not a saved timm model")
        return timm.create_model(f"local-dir:{path}", pretrained=True), path
    if name.startswith("local-dir:"):
        raise ValueError(f"{name!r}: no such directory")
    return timm.create_model(name, pretrained=pretrained or name.startswith("hf-hub:")), name


def _prune(args: argparse.Namespace) -> int:
    # Everything that can be checked is checked before the model loads and before anything is written.
    output = os.fspath(args.output)
    if os.path.exists(output) and (not os.path.isdir(output) or (os.listdir(output) and not args.overwrite)):
        raise ValueError(f"--output {output!r} exists and is not an empty directory (pass --overwrite to reuse it)")
    config = _prune_config(args)
    needs_data = get_method(config.method).needs_calibration or args.bn_batches > 0
    if needs_data and not args.dataset:
        raise ValueError(f"--method {config.method} needs calibration images: pass --dataset")
    for flag in ("batch_size", "bn_batches"):
        if getattr(args, flag) < (1 if flag == "batch_size" else 0):
            raise ValueError(f"--{flag.replace('_', '-')} must be >= {1 if flag == 'batch_size' else 0}")
    try:
        model, base = _load_for_pruning(args.model, not args.no_pretrained)
    except RuntimeError as e:  # timm: unknown model name
        raise ValueError(f"cannot create {args.model!r}: {e}") from None
    batches, dataset_name = [], None
    if needs_data:
        count = config.calibration_batches if hasattr(config.method_options, "calibration_batches") else 0
        count = max(count, args.bn_batches)
        size = args.image_size or _model_image_size(model)
        cfg = model.pretrained_cfg
        mean, std = cfg.get("mean", (0.5, 0.5, 0.5)), cfg.get("std", (0.5, 0.5, 0.5))
        in_chans = getattr(model, "in_chans", None) or cfg.get("input_size", (3,))[0]
        limit = count * args.batch_size
        images, _, dataset_name = load_eval_tensors(args.dataset, args.split, size, in_chans, mean, std, limit)
        batches = list(torch.split(images, args.batch_size))
    pm = convert(model.eval(), config)
    if pm.pruner.needs_calibration:
        pm.calibrate(batches)
    report = pm.prune()
    if args.bn_batches:
        pm.recalibrate_batchnorm(batches, num_batches=args.bn_batches)
    if config.recovery != "none":
        pm.recover()
    pm.base_model = base
    if dataset_name is not None:
        pm.metrics.update(calibration_dataset=dataset_name, calibration_images=sum(len(b) for b in batches))
    pm.save_pretrained(output)
    skipped = f", {len(pm.pruner.pattern_skipped)} layer(s) left dense" if pm.pruner.pattern_skipped else ""
    print(
        f"pruned {args.model} with {config.method} to {report.sparsity:.2%} of {report.numel:,} targeted weights"
        f"{f' ({config.pattern})' if config.pattern else ''}{skipped}; saved to {output}"
    )
    return 0


# ------------------------------------------------------------------------------------------------ push
def _push(args: argparse.Namespace) -> int:
    url = push_folder(
        args.directory,
        args.repo_id,
        private=args.private,
        revision=args.revision,
        commit_message=args.commit_message,
        token=args.token,
    )
    print(f"pushed {args.directory} to {args.repo_id}: {url}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
