"""Cost of a one-shot prune (no training): Wanda and SparseGPT against magnitude, in the same run.

Each case (model x method) runs in a fresh Python subprocess so that allocator state and caches of one case do
not leak into the next. In the child: a randomly initialised timm model in eval mode, ``--images`` random
calibration images at the model's input size in batches of ``--batch_size``, and one dense forward of one batch
(warm-up). Then, timed and with the resident memory sampled every 5 ms (``prune_cost.PeakRss``):
``convert`` + ``calibrate`` (Wanda: one pass of feature norms; SparseGPT: the sequential pass, one Hessian and
one OBS solve per layer, weights updated in place) + ``prune()`` at 50 % per layer. Reported: wall time per phase,
peak extra RSS over the state before the prune (model + images + one forward already resident), and the model's
own size for scale. Writes bench/results/oneshot_cost.{json,md} (``--quick``: bench/results/quick/).

    python bench/oneshot_cost.py                 # resnet50 + vit_base_patch16_224 at 224 px, 128 images, 1 thread
    python bench/oneshot_cost.py --quick         # test_resnet + test_vit, 16 images: checks the script only
    python bench/oneshot_cost.py --threads 2 --methods sparsegpt --models resnet50
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
HERE = Path(__file__).resolve().parent
DEFAULT_MODELS = ["resnet50", "vit_base_patch16_224"]
QUICK_MODELS = ["test_resnet", "test_vit"]
METHODS = ["magnitude", "wanda", "sparsegpt"]


def run_case(model_name: str, method: str, images: int, batch_size: int, img_size: int | None, threads: int) -> dict:
    """One case, in this process (the child): returns the measured row."""
    import timm
    import torch

    sys.path.insert(0, str(HERE))
    from prune_cost import PeakRss

    import timm_prune
    from timm_prune.methods import get_method

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    try:  # ViTs are built for the resolution; CNNs take any
        model = timm.create_model(model_name, pretrained=False, **({"img_size": img_size} if img_size else {}))
    except TypeError:
        model = timm.create_model(model_name, pretrained=False)
    model.eval()
    size = img_size or model.pretrained_cfg["input_size"][-1]
    generator = torch.Generator().manual_seed(0)
    data = torch.randn(images, 3, size, size, generator=generator)
    batches = list(data.split(batch_size))
    with torch.no_grad():
        model(batches[0])  # warm-up: one dense forward's memory is part of the baseline
    model_mb = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**20
    config = {"calibration_batches": len(batches)} if get_method(method).needs_calibration else {}
    with PeakRss() as rss:
        start = time.perf_counter()
        pm = timm_prune.convert(model, method=method, sparsity=0.5, **config)
        logs = pm.calibrate(batches) if pm.pruner.needs_calibration else {}
        calibrated = time.perf_counter()
        report = pm.prune()
        done = time.perf_counter()
    return {
        "model": model_name,
        "method": method,
        "img_size": size,
        "images": images,
        "batch_size": batch_size,
        "threads": threads,
        "target_layers": len(pm.targets),
        "sparsity": round(report.sparsity, 4),
        "calibrate_s": round(calibrated - start, 2),
        "prune_s": round(done - calibrated, 2),
        "total_s": round(done - start, 2),
        "peak_extra_rss_mb": round((rss.peak - rss.start) / 2**20, 1),
        "rss_before_mb": round(rss.start / 2**20, 1),
        "max_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
        "model_mb": round(model_mb, 1),
        "calibration_passes": logs.get("passes"),
    }


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "# One-shot prune cost (no training)",
        "",
        f"{meta['images']} random calibration images, batch {meta['batch_size']}, sparsity 0.5 per layer, random "
        f"weights, {meta['threads']} thread(s), CPU: {meta['cpu']}. One fresh process per case. "
        "Peak extra RSS: over the resident state before the prune (model, images and one dense forward).",
        "",
        "| model | px | method | calibrate (s) | prune (s) | total (s) | peak extra RSS (MB) | model (MB) | passes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"| {r['model']} | - | {r['method']} | error: {r['error'][:80]} | | | | | |")
            continue
        passes = r["calibration_passes"] or "-"
        lines.append(
            f"| {r['model']} | {r['img_size']} | {r['method']} | {r['calibrate_s']:.1f} | {r['prune_s']:.1f} | "
            f"{r['total_s']:.1f} | {r['peak_extra_rss_mb']:.0f} | {r['model_mb']:.0f} | {passes} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--models", nargs="+", default=None)
    p.add_argument("--methods", nargs="+", default=METHODS)
    p.add_argument("--images", type=int, default=None, help="calibration images (default 128; --quick 16)")
    p.add_argument("--batch_size", type=int, default=16)
    p.add_argument("--img_size", type=int, default=None, help="default: the model's (224); --quick 32")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--quick", action="store_true", help="tiny models: checks that the script runs")
    p.add_argument("--timeout", type=int, default=3600, help="seconds per case")
    p.add_argument("--case", default=None, help=argparse.SUPPRESS)  # child mode: MODEL:METHOD
    args = p.parse_args(argv)
    images = args.images or (16 if args.quick else 128)
    img_size = args.img_size or (32 if args.quick else None)
    if args.case:
        model_name, method = args.case.split(":")
        print(json.dumps(run_case(model_name, method, images, args.batch_size, img_size, args.threads)))
        return
    models = args.models or (QUICK_MODELS if args.quick else DEFAULT_MODELS)
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    rows = []
    for model_name in models:
        for method in args.methods:
            command = [sys.executable, __file__, "--case", f"{model_name}:{method}", "--images", str(images)]
            command += ["--batch_size", str(args.batch_size), "--threads", str(args.threads)]
            command += ["--img_size", str(img_size)] if img_size else []
            try:
                result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=args.timeout)
            except subprocess.TimeoutExpired:  # a row that says so; the other cases still run
                row = {"model": model_name, "method": method, "error": f"over --timeout {args.timeout} s"}
                rows.append(row)
                print(json.dumps(row), flush=True)
                continue
            if result.returncode != 0:
                row = {"model": model_name, "method": method, "error": result.stderr.strip().splitlines()[-1:]}
                row["error"] = row["error"][0] if row["error"] else f"exit {result.returncode}"
            else:
                row = json.loads(result.stdout.strip().splitlines()[-1])
            rows.append(row)
            print(json.dumps(row), flush=True)
    meta = {
        "images": images,
        "batch_size": args.batch_size,
        "threads": args.threads,
        "cpu": platform.processor() or platform.machine(),
        "torch_threads_env": env["OMP_NUM_THREADS"],
        "quick": args.quick,
    }
    out = RESULTS / "quick" if args.quick else RESULTS
    out.mkdir(parents=True, exist_ok=True)
    (out / "oneshot_cost.json").write_text(json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n")
    (out / "oneshot_cost.md").write_text(markdown(rows, meta))
    print(markdown(rows, meta))


if __name__ == "__main__":
    main()
