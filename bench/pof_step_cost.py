"""What each part of a POF fine-tuning recipe costs per training step, against plain training, at two input sizes.

The recipe's POF settings (read from its YAML) and the same settings with one part switched off, each timed
against plain training on identical batches, interleaved (``_cifar10_eval.step_time_ratio``: the median of the
ratios of adjacent steps; the mean ratio counts the candidate re-selection every ``threshold_refresh`` steps).
One thread, bf16 autocast and channels-last tensors, as benchmark v2 trains ConvNeXt (``--no-bf16``: fp32, as it
trains the ResNet).

At benchmark v2's 32 px a ConvNeXt-atto step spends little on activations, so the passes over all 3.7 M weights
that POF adds (the re-parametrisation, the penalty and their backward) weigh more than they would on real inputs;
the second size shows how the ratio moves.

Writes bench/results/<model>/pof_step_cost.{json,md}.

    OMP_NUM_THREADS=1 python bench/pof_step_cost.py      # about 15 minutes on a quiet machine
    OMP_NUM_THREADS=1 python bench/pof_step_cost.py --config recipes/configs/cifar10_finetune_pof.yaml --no-bf16 \
        --model resnet18 --model_kwargs '{"channels": [32, 64, 128, 256], "stem_width": 32}' \
        --img_sizes 36 --results bench/results    # the ResNet recipe
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from _cifar10_eval import step_time_ratio
from _cifar10_v2_report import write_figures
from _recipe_runner import ROOT, recipe_prune_config

# Each variant: the recipe's POF fields overridden by these.
VARIANTS = {
    "recipe": {},
    "plain weights (hyperspherical=False)": {"hyperspherical": False},
    "plain weights, penalty every 4th call": {"hyperspherical": False, "penalty_every": 4},
    "no penalty (pruned forwards only)": {"penalty_weight": 0.0},
    "plain weights, no penalty": {"hyperspherical": False, "penalty_weight": 0.0},
    # Also the steps of a recipe after its pruned_forward_until ("recipe" times those before: every timed step is).
    "no pruned forwards": {"pruned_forward": 0.0},
    "plain weights, no pruned forwards": {"hyperspherical": False, "pruned_forward": 0.0},
    "pruned forwards 0.25 to the end": {"pruned_forward": 0.25, "pruned_forward_until": 0},
}


def device_name(device: str) -> str:
    """The accelerator's name (the one the timings are of), or "cpu"."""
    return torch.cuda.get_device_name(torch.device(device)) if torch.device(device).type == "cuda" else "cpu"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default=str(ROOT / "recipes" / "configs" / "cifar10_finetune_pof_convnext.yaml"))
    p.add_argument("--model", default="convnext_atto", help="timm name (random weights: only the time matters)")
    p.add_argument("--model_kwargs", type=json.loads, default={}, help="create_model kwargs (JSON object)")
    p.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=True, help="bf16 + channels-last")
    p.add_argument("--img_sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--batch_size", type=int, default=128)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--results", default=None, help="default: bench/results/<model>")
    p.add_argument("--device", default="cpu", help="where both train, e.g. cuda (then the threads do not matter)")
    args = p.parse_args()
    torch.set_num_threads(1)
    recipe = recipe_prune_config(args.config)
    method = recipe.pop("method")
    rows = []
    for size in args.img_sizes:
        torch.manual_seed(0)
        images = torch.randn(args.batch_size, 3, size, size)
        labels = torch.randint(0, 10, (args.batch_size,))
        for name in args.variants:
            options = {**recipe, **VARIANTS[name]}
            timing = step_time_ratio(
                args.model,
                args.model_kwargs,
                images,
                labels,
                options,
                steps=args.steps,
                method=method,
                bf16=args.bf16,
                device=args.device,
            )
            rows.append({"img_size": size, "variant": name, **timing})
            print(
                f"[{size} px] {name}: x{timing['step_time_ratio']:.3f} median, x{timing['mean_step_time_ratio']:.3f}"
                " mean",
                flush=True,
            )
    precision = "bf16, channels-last" if args.bf16 else "fp32"
    where = "One thread" if args.device == "cpu" else f"On {args.device} ({device_name(args.device)})"
    lines = [
        f"# POF step cost by part, {args.model}",
        "",
        f"Recipe: `{Path(args.config).relative_to(ROOT) if Path(args.config).is_relative_to(ROOT) else args.config}`. "
        f"{where}, {precision}; {args.steps} interleaved POF / plain steps per case, batch {args.batch_size}. "
        "Median: of the ratios of adjacent steps; mean: with the candidate re-selections.",
        "",
        "| input | variant | median step ratio | mean step ratio | plain step (s) |",
        "|---|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['img_size']} px | {row['variant']} | x{row['step_time_ratio']:.3f} | "
            f"x{row['mean_step_time_ratio']:.3f} | {row['median_step_s_plain']:.3f} |"
        )
    out = Path(args.results or ROOT / "bench" / "results" / args.model)
    payload = {"model": args.model, "model_kwargs": args.model_kwargs, "bf16": args.bf16, "config": args.config}
    payload.update(device=args.device, device_name=device_name(args.device), torch=torch.__version__)
    payload.update(recipe={"method": method, **recipe}, rows=rows)
    write_figures(out, "pof_step_cost", payload, lines)
    print("\n".join(lines))


if __name__ == "__main__":
    main()
