"""``timm-prune``: inspect, evaluate and publish saved pruned models.

    timm-prune info  MODEL [--revision R] [--json]
    timm-prune eval  MODEL --dataset digits|DIR|HUB_ID [--split test] [--recovery KIND ...] [--limit N] [--json]
    timm-prune push  DIR REPO_ID [--private] [--revision R] [--commit-message M]

MODEL is a directory written by ``save_pretrained`` or a Hub id (``user/name``, ``hf-hub:user/name@rev``).
``--dataset digits`` is scikit-learn's 8x8 handwritten digits (10 classes, offline), upscaled and
replicated to the model's input; anything else goes to ``datasets.load_dataset`` (a local parquet or
image folder, or a Hub dataset id).
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

import torch

from .config import RECOVERY_KINDS
from .data import load_eval_tensors
from .hub import FileFormatError, HubUnreachableError, push_folder, read_pruning_info
from .hub.card import default_recovery
from .model import from_pretrained


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
    ev.add_argument("--limit", type=int, default=None, help="evaluate the first N examples only")
    ev.add_argument("--batch-size", type=int, default=64)
    ev.add_argument("--image-size", type=int, default=None, help="input side (default: the model's)")
    ev.add_argument("--json", action="store_true", help="print the results as JSON")
    ev.set_defaults(func=_eval)

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
    images, labels, name = load_eval_tensors(args.dataset, args.split, size, in_chans, mean, std, args.limit)
    results = []
    for kind in kinds:
        pm.recover(kind)
        correct = _count_correct(pm, images, labels, args.batch_size)
        results.append({"recovery": kind, "accuracy": correct / len(labels), "correct": correct, "total": len(labels)})
    if args.json:
        print(json.dumps({"model": args.model, "dataset": name, "split": args.split, "results": results}, indent=2))
        return 0
    sparsity = _pruned_summary(pm)
    print(f"model:    {args.model} ({pm.model.pretrained_cfg.get('architecture')}, {pm.config.method}, {sparsity})")
    print(f"dataset:  {name} [{args.split}]: {len(labels)} images at {size}x{size}")
    print(f"{'recovery':<12} {'accuracy':>9} {'correct':>12}")
    for row in results:
        print(f"{row['recovery']:<12} {row['accuracy']:>9.2%} {row['correct']:>6}/{row['total']}")
    return 0


def _model_image_size(model: torch.nn.Module) -> int:
    traits = getattr(model, "_traits", {}) or {}  # timm records the img_size a model was built with
    if traits.get("img_size"):
        return int(traits["img_size"][-1])
    return int(model.pretrained_cfg.get("input_size", (3, 224, 224))[-1])


@torch.no_grad()
def _count_correct(model: torch.nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int) -> int:
    model.eval()
    correct = 0
    for start in range(0, len(labels), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct


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
