"""POF on a CUDA device: the same training, pruning and saving as on the CPU, and a round trip through the files.

The test suite runs on the CPU only (CI has no accelerator). This script is the check for users who train on a GPU:
for each model, two copies of one POF model (the fine-tuning recipes' settings: pruned forwards, the penalty,
nested levels) train the same steps on the same batches, one on the CPU and one on ``--device``, in fp32 with TF32
off; then each is pruned at every level and mean-recovered. It reports how far the two drift apart (losses,
weights, the pruning masks, the recovered outputs), then saves the device model with ``save_pretrained``, loads it
on the CPU with ``from_pretrained`` and compares the outputs. Last, a few bf16-autocast steps on the device with
channels-last tensors (as ``accelerate launch --mixed_precision bf16`` trains) must give finite losses.

Writes <results>/gpu_check.{json,md}; exits 1 if a check fails.

    python bench/gpu_check.py --device cuda --results bench/results/gpu
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import tempfile
import warnings
from pathlib import Path

import timm
import torch
import torch.nn.functional as F
from _cifar10_v2_report import write_figures

import timm_prune

# name, create_model kwargs, input size, the POF fields that differ between the cases.
MODELS = {
    "resnet18 (half width)": ("resnet18", {"channels": [32, 64, 128, 256], "stem_width": 32}, 36),
    "convnext_atto": ("convnext_atto", {}, 32),
    "vit_tiny_patch16_224 (32 px)": ("vit_tiny_patch16_224", {"img_size": 32, "patch_size": 4}, 32),
}
CASES = {
    "plain weights, kept-only gradients (the ResNet recipe)": {"hyperspherical": False, "straight_through": False},
    "hyperspherical weights, straight-through": {"hyperspherical": True, "straight_through": True},
}
LEVELS = [0.5, 0.7, 0.9, 0.95]
# Exact thresholds and LAMP scores: their random samples come from per-device generators, whose streams differ.
POF = {
    "sparsity": 0.9,
    "scope": "lamp",
    "penalty_weight": 30.0,
    "penalty_sparsities": LEVELS,
    "pruned_forward": 0.5,
    "threshold_sample": 0,
    "lamp_sample": 0,
    "threshold_refresh": 2,
}
# Tolerances: fp32 on two devices differs by summation order only; a few SGD steps keep that at rounding level,
# except where a candidate set flips on a near-tie (counted, not failed: the mask agreement says how often).
MAX_WEIGHT_DRIFT = 1e-3  # largest |p_cpu - p_dev| over a parameter, relative to its largest |p|
MIN_MASK_AGREEMENT = 0.999
MAX_OUTPUT_DRIFT = 1e-3  # largest |logit difference| over the largest |logit|


def relative_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float().cpu() - b.float().cpu()).abs().max() / a.float().abs().max().clamp_min(1e-12))


def train(pm: timm_prune.PrunableModel, batches: list, device: str, bf16: bool = False) -> list[float]:
    optimizer = torch.optim.SGD(pm.parameters(), lr=0.01, momentum=0.9)
    losses = []
    pm.train()
    for step, (images, labels) in enumerate(batches):
        images, labels = images.to(device), labels.to(device)
        if bf16:
            images = images.contiguous(memory_format=torch.channels_last)
        with torch.autocast(torch.device(device).type, dtype=torch.bfloat16, enabled=bf16):
            loss = F.cross_entropy(pm(images), labels) + pm.penalty()
        loss.backward()
        optimizer.step()
        pm.on_step_end(step=step + 1, total_steps=len(batches))
        optimizer.zero_grad()
        losses.append(float(loss))
    return losses


def host_syncs(pm: timm_prune.PrunableModel, batches: list, device: str) -> dict:
    """Training steps under CUDA's sync debug mode: how many times a step waited for the device, and where.

    A step that reads a device value on the host (``int(tensor)``, ``.item()``, a ``bool`` of a tensor) waits
    for every kernel queued before it, so the host can no longer queue ahead and small steps pay the kernel
    launches on top of the kernels. The loss is not read (the caller's loop would)."""
    if torch.device(device).type != "cuda":
        return {"syncs_per_step": None, "sync_sites": []}
    optimizer = torch.optim.SGD(pm.parameters(), lr=0.01, momentum=0.9)
    pm.train()
    sites: dict[str, int] = {}
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for step, (images, labels) in enumerate(batches):
                loss = F.cross_entropy(pm(images.to(device)), labels.to(device)) + pm.penalty()
                loss.backward()
                optimizer.step()
                pm.on_step_end(step=step + 1, total_steps=len(batches))
                optimizer.zero_grad()
        finally:
            torch.cuda.set_sync_debug_mode("default")
    for warning in caught:
        if "synchroniz" in str(warning.message):
            site = f"{Path(warning.filename).name}:{warning.lineno}"
            sites[site] = sites.get(site, 0) + 1
    return {"syncs_per_step": sum(sites.values()) / len(batches), "sync_sites": sorted(sites.items())}


def pruned_copy(model: torch.nn.Module, case: dict, state: dict, level: float, device: str) -> timm_prune.PrunableModel:
    """A fresh POF conversion of ``model`` holding ``state``, pruned at ``level`` and mean-recovered, in eval mode."""
    config = timm_prune.PruneConfig(method="pof", **{**POF, **case, "sparsity": level})
    pm = timm_prune.convert(copy.deepcopy(model), config).to(device)
    pm.load_state_dict(state)
    pm.prune()
    pm.recover()
    return pm.eval()


def check_model(label: str, name: str, kwargs: dict, size: int, case: dict, device: str, steps: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **kwargs)
    config = timm_prune.PruneConfig(method="pof", **POF, **case)
    on_cpu = timm_prune.convert(copy.deepcopy(model), config)
    on_device = timm_prune.convert(copy.deepcopy(model), config).to(device)
    generator = torch.Generator().manual_seed(1)
    batches = [(torch.randn(32, 3, size, size, generator=generator), torch.randint(0, 10, (32,))) for _ in range(steps)]
    loss_cpu, loss_device = train(on_cpu, batches, "cpu"), train(on_device, batches, device)
    weights_cpu, weights_device = on_cpu.state_dict(), on_device.state_dict()
    # The trained parameters only. The state also holds the candidate counts (uint8: one entry at a near-tie is a gap
    # of 1 in 4; their agreement is reported on its own) and BatchNorm's running statistics.
    parameters = [name for name, _ in on_cpu.named_parameters()]
    weight_drift = max(relative_gap(weights_cpu[k], weights_device[k]) for k in parameters)
    counts_cpu, counts_device = on_cpu.pruner.candidate_counts(), on_device.pruner.candidate_counts()
    same = sum(int((counts_cpu[k] == counts_device[k].cpu()).sum()) for k in counts_cpu)
    row_candidates = same / sum(c.numel() for c in counts_cpu.values())
    probe = batches[0][0]
    row = {"model": label, "case": next(k for k, v in CASES.items() if v == case), "steps": steps}
    row.update(loss_gap=max(abs(a - b) for a, b in zip(loss_cpu, loss_device, strict=True)), weight_drift=weight_drift)
    row["candidate_agreement"] = row_candidates
    mask_agreement, output_drift = [], []
    for level in LEVELS:
        pm_cpu = pruned_copy(model, case, weights_cpu, level, "cpu")
        pm_device = pruned_copy(model, case, weights_device, level, device)
        same = sum(int((pm_cpu.masks[k] == pm_device.masks[k].cpu()).sum()) for k in pm_cpu.masks)
        mask_agreement.append(same / sum(m.numel() for m in pm_cpu.masks.values()))
        with torch.no_grad():
            output_drift.append(relative_gap(pm_cpu(probe), pm_device(probe.to(device))))
    row.update(levels=LEVELS, mask_agreement=mask_agreement, recovered_output_drift=output_drift)
    # Round trip: the device model pruned at 90 %, saved, loaded back on the CPU.
    pm_90 = pruned_copy(model, case, weights_device, 0.9, device)
    with torch.no_grad(), tempfile.TemporaryDirectory() as folder:
        expected = pm_90(probe.to(device))
        pm_90.save_pretrained(folder, pretrained=False)
        loaded = timm_prune.from_pretrained(folder)
        row["reload_output_drift"] = relative_gap(expected, loaded(probe))
    # Host syncs: POF's steps against plain training's (magnitude, which adds nothing to a step), on the device.
    # Steps of the refresh (every threshold_refresh-th) re-select the candidates and may sync; the rest must not.
    row["pof_syncs"] = host_syncs(on_device, batches, device)
    plain = timm_prune.convert(copy.deepcopy(model), timm_prune.PruneConfig(method="magnitude")).to(device)
    row["plain_syncs"] = host_syncs(plain, batches, device)
    # Mixed precision on the device, a fresh copy: the losses must stay finite.
    mixed = timm_prune.convert(copy.deepcopy(model), config).to(device).to(memory_format=torch.channels_last)
    row["bf16_losses_finite"] = all(math.isfinite(x) for x in train(mixed, batches, device, bf16=True))
    row["passed"] = bool(
        weight_drift <= MAX_WEIGHT_DRIFT
        and min(mask_agreement) >= MIN_MASK_AGREEMENT
        and max(output_drift) <= MAX_OUTPUT_DRIFT
        and row["reload_output_drift"] <= MAX_OUTPUT_DRIFT
        and row["bf16_losses_finite"]
    )
    return row


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda")
    p.add_argument("--steps", type=int, default=8, help="training steps on each device")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--results", default="bench/results/gpu")
    args = p.parse_args()
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        sys.exit(f"gpu_check: --device {args.device} asked for, but torch {torch.__version__} sees no CUDA device")
    # fp32 on both devices: TF32 would round matrix products to 10 mantissa bits on the GPU only.
    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    rows = []
    for label in args.models:
        for case in CASES.values():
            rows.append(check_model(label, *MODELS[label], case, args.device, args.steps))
            print(json.dumps(rows[-1]), flush=True)
    device_name = torch.cuda.get_device_name(args.device) if torch.device(args.device).type == "cuda" else "cpu"
    lines = [
        f"# POF on {args.device} ({device_name}) against the CPU",
        "",
        f"torch {torch.__version__}, timm {timm.__version__}; {args.steps} SGD steps of batch 32 on each device, fp32 "
        "(TF32 off), then pruned at each level and mean-recovered. Drifts are the largest difference over the "
        "largest magnitude.",
        "",
        "| model | case | weight drift | mask agreement (min) | recovered output drift (max) | reload drift | "
        "bf16 finite | host syncs per step, POF / plain | passed |",
        "|---|---|---:|---:|---:|---:|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['model']} | {r['case']} | {r['weight_drift']:.1e} | {min(r['mask_agreement']):.5f} | "
            f"{max(r['recovered_output_drift']):.1e} | {r['reload_output_drift']:.1e} | {r['bf16_losses_finite']} | "
            f"{r['pof_syncs']['syncs_per_step']} / {r['plain_syncs']['syncs_per_step']} | {r['passed']} |"
        )
    payload = {"device": args.device, "device_name": device_name, "torch": torch.__version__, "rows": rows}
    write_figures(Path(args.results), "gpu_check", payload, lines)
    print("\n".join(lines))
    sys.exit(0 if all(r["passed"] for r in rows) else 1)


if __name__ == "__main__":
    main()
