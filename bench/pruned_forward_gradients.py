"""Loss and gradient norm of a pruned forward against a dense one, at each of a recipe's levels (a diagnostic).

A POF fine-tuning recipe prunes some of its training forwards (``pruned_forward``). On a trained model a forward
pruned at 90-95 % has a much larger loss and gradient than a dense one; under AdamW, whose second-moment estimate
remembers about as many steps as a short fine-tuning run, that scale keeps every dense step smaller for the rest
of the run. This measures it on a base model, before any fine-tuning: the recipe's POF settings, the candidate
sets selected from the base's weights, un-augmented training images.

    OMP_NUM_THREADS=1 python bench/pruned_forward_gradients.py      # ConvNeXt-atto base, under a minute

Writes ``<results>/pruned_forward_gradients.json`` (default: the base's results folder).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import timm
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _cifar10_eval import DataSpec, load_eval_tensors, split_batches  # noqa: E402
from _cifar10_v2_report import atomic_write_text  # noqa: E402
from _recipe_runner import ROOT, recipe_prune_config  # noqa: E402

import timm_prune  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "cifar10_finetune_pof_convnext.yaml"))
    p.add_argument("--base", default=str(ROOT / "bench" / "base_cache_convnext_atto"), help="save_pretrained folder")
    p.add_argument("--data", default=str(ROOT.parent / "shared" / "datasets" / "cifar10"))
    p.add_argument("--img_size", type=int, default=32)
    p.add_argument("--batches", type=int, default=4, help="batches of 128 training images")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 autocast, as trained")
    p.add_argument("--results", default=str(ROOT / "bench" / "results" / "convnext_atto"))
    args = p.parse_args()
    torch.set_num_threads(1)
    if not Path(args.data).exists():
        raise SystemExit(f"--data {args.data}: no such folder (CIFAR-10 as parquet, loadable by datasets)")
    options = recipe_prune_config(args.config)
    options.pop("method")
    # Every forward pruned, at the level chosen below; the candidate sets come from the base's weights.
    options.update(pruned_forward=1.0, pruned_forward_until=0, pruned_forward_sparsities=None)
    model = timm.create_model(f"local-dir:{args.base}", pretrained=True)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(method="pof", **options))
    (_, _), (images, labels) = load_eval_tensors(DataSpec(args.data, args.img_size, 0.1, 0, 128, None), model, "val")
    batches = list(zip(split_batches(images, 128, args.batches), split_batches(labels, 128, args.batches), strict=True))
    pm.train()
    pm.penalty()  # selects the candidate sets
    levels = pm.pruner.penalty_sparsities
    layers = {name: module.weight for name, module in pm.pruner.layers.items()}
    rows, per_layer = [], {}
    for level in [None, *levels]:
        # Only the level this forward runs at differs: pin it (None: a dense forward).
        sparsities = None if level is None else [level]
        pm.pruner.config.pruned_forward = 0.0 if level is None else 1.0
        pm.pruner.config.pruned_forward_sparsities = sparsities
        losses, norms, layer_sq = [], [], dict.fromkeys(layers, 0.0)
        for x, y in batches:
            pm.zero_grad()
            with torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.bf16):
                loss = F.cross_entropy(pm(x), y)
            loss.backward()  # a pruned forward's gradient comes scaled by the recipe's pruned_forward_loss_weight
            grads = [p.grad.float().square().sum() for p in pm.parameters() if p.grad is not None]
            losses.append(float(loss.detach()))
            norms.append(float(torch.stack(grads).sum().sqrt()))
            for name, weight in layers.items():
                layer_sq[name] += float(weight.grad.float().square().mean()) / len(batches)
        row = {"forward": "dense" if level is None else f"pruned {level:.0%}", "sparsity": level or 0.0,
               "loss": sum(losses) / len(losses), "grad_norm": sum(norms) / len(norms)}  # fmt: skip
        rows.append(row)
        per_layer[row["forward"]] = {name: sq**0.5 for name, sq in layer_sq.items()}
        print(f"{row['forward']:>12}: loss {row['loss']:.3f}, gradient norm {row['grad_norm']:.2f}", flush=True)
    dense = rows[0]["grad_norm"]
    for row in rows:
        row["grad_norm_vs_dense"] = row["grad_norm"] / dense
    per_layer["penalty"] = _penalty_gradients(model_path=args.base, options=options, layers=list(layers))
    # Per layer: the root mean square of each gradient over the weight's entries, against a dense forward's. AdamW
    # divides every step by the root of its running mean of squares: where a kind of step has much larger
    # gradients than a dense one, the dense steps of that layer move that much less.
    print(f"\n{'layer':<34}" + "".join(f"{k:>13}" for k in per_layer if k != "dense") + "   (RMS vs dense)")
    for name in layers:
        ratios = {k: v[name] / per_layer["dense"][name] for k, v in per_layer.items() if k != "dense"}
        print(f"{name:<34}" + "".join(f"{r:13.2f}" for r in ratios.values()))
    out = Path(args.results) / "pruned_forward_gradients.json"
    record = {"config": args.config, "base": args.base, "img_size": args.img_size, "batches": args.batches,
              "batch_size": 128, "bf16": args.bf16, "rows": rows, "per_layer_grad_rms": per_layer}  # fmt: skip
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(f"wrote {out}")


def _penalty_gradients(model_path: str, options: dict, layers: list[str]) -> dict[str, float]:
    """Per layer, the RMS of the penalty's gradient on a step it runs (``penalty_every`` times its weight), at full
    weight (after the warm-up), candidates selected from the base."""
    every = options.get("penalty_every", 1)
    config = {**options, "penalty_every": 1, "penalty_warmup": 0, "pruned_forward": 0.0}
    pm = timm_prune.convert(timm.create_model(f"local-dir:{model_path}", pretrained=True),
                            timm_prune.PruneConfig(method="pof", **config)).train()  # fmt: skip
    (every * pm.penalty()).backward()
    return {name: float(pm.pruner.layers[name].weight.grad.float().square().mean()) ** 0.5 for name in layers}


if __name__ == "__main__":
    main()
