"""Evaluation side of ``bench/cifar10.py``: retrain-free pruning variants of one trained run, and the checks.

Everything here loads what the recipe saved (its last epoch checkpoint, safetensors) into a fresh timm model
converted with the run's method, prunes at each (scope, sparsity), and measures top-1 for each variant:

- ``zero``: the pruned weights as they are;
- ``mean`` / ``layer_mean`` / ``renorm``: the data-free recoveries of ``PrunableModel.recover``;
- ``bn_recal``: BatchNorm statistics re-estimated on a few un-augmented training batches (uses data);
- ``mean+bn_recal``: mean recovery, then BatchNorm re-estimation;
- ``bias``: pruned with bias correction (``prune(bias_correction_batches=...)``) on the batches BatchNorm
  re-estimation uses: each layer with a bias gets its dense mean output back (uses data; for LayerNorm nets).
"""

from __future__ import annotations

import glob
import os
import statistics
import time
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn as nn
import torch.nn.functional as F
from safetensors.torch import load_file
from timm.optim import create_optimizer_v2

import timm_prune
from timm_prune.data import create_transforms, load_image_splits

DATA_FREE = ("mean", "layer_mean", "renorm")
# Every variant run_eval_job can measure (a job lists the ones it wants).
VARIANTS = ("zero",) + DATA_FREE + ("bn_recal", "mean+bn_recal", "bias")


@dataclass
class DataSpec:
    """Where the images come from and how they are shaped (the same as the recipe runs were given)."""

    path: str
    img_size: int
    validation_fraction: float
    seed: int
    batch_size: int = 128
    max_eval_samples: int | None = None


@dataclass
class EvalJob:
    """One trained run, evaluated on one split over a grid of (scope, sparsity) x variants."""

    run: str
    run_dir: str
    model: str
    model_kwargs: dict[str, Any]
    method: str
    options: dict[str, Any]
    split: str  # "test" (reported figures) or "val" (the held-out part of train: decisions)
    scopes: list[str]
    sparsities: list[float]
    variants: list[str]
    bn_batches: int
    data: DataSpec
    threads: int = 1
    # bfloat16 autocast and channels-last memory format: about 2x faster on CPUs with bf16 units; every
    # contender of one benchmark is evaluated the same way.
    bf16: bool = False
    # Where the trained weights are: the run's last epoch checkpoint (default) or a saved model directory.
    weights: str = "checkpoint"


def create_model(name: str, model_kwargs: dict[str, Any], num_classes: int = 10) -> nn.Module:
    return timm.create_model(name, pretrained=False, num_classes=num_classes, **model_kwargs)


def _to_tensors(dataset: Any, image_column: str, label_column: str, transform: Any) -> tuple:
    images = torch.stack([transform(img.convert("RGB")) for img in dataset[image_column]])
    return images, torch.tensor(dataset[label_column])


def load_eval_tensors(data: DataSpec, model: nn.Module, split: str) -> tuple[tuple, tuple]:
    """(images, labels) of ``split`` and of the BatchNorm batches, transformed once (un-augmented)."""
    splits = load_image_splits(
        data.path,
        "img",
        "label",
        data.validation_fraction,
        data.seed,
        max_eval_samples=data.max_eval_samples,
        validation_split="test" if split == "test" else "holdout",
    )
    _, eval_tf, _ = create_transforms(model, data.img_size, 1.0, {"none": True})
    evaluation = _to_tensors(splits.validation, splits.image_column, splits.label_column, eval_tf)
    # The recipe's BatchNorm batches: un-augmented training images in a seeded order.
    order = torch.randperm(len(splits.train), generator=torch.Generator().manual_seed(data.seed))
    subset = splits.train.select(order[: 40 * data.batch_size].tolist())
    bn = _to_tensors(subset, splits.image_column, splits.label_column, eval_tf)
    return evaluation, bn


def split_batches(images: torch.Tensor, batch_size: int, count: int) -> list[torch.Tensor]:
    """The first ``count`` batches of ``batch_size`` images (BatchNorm re-estimation and calibration)."""
    return [images[i : i + batch_size] for i in range(0, len(images), batch_size)][:count]


@torch.no_grad()
def top1(model: nn.Module, images: torch.Tensor, labels: torch.Tensor, batch_size: int = 500) -> float:
    model.eval()
    correct = 0
    for start in range(0, len(images), batch_size):
        logits = model(images[start : start + batch_size])
        correct += int((logits.argmax(-1) == labels[start : start + batch_size]).sum())
    return correct / len(images)


def saved_weights(directory: str) -> dict[str, torch.Tensor]:
    """A ``save_pretrained`` directory's merged weights, keyed as a converted model's state (``model.`` prefix)."""
    return {f"model.{k}": v for k, v in load_file(os.path.join(directory, "model.safetensors")).items()}


def dense_checkpoint(run_dir: str) -> dict[str, torch.Tensor]:
    """The trained, unpruned weights: the recipe's last epoch checkpoint (safetensors, no pickle)."""
    epochs = sorted(glob.glob(os.path.join(run_dir, "checkpoints", "epoch_*")), key=lambda p: int(p.rsplit("_", 1)[1]))
    if not epochs:
        raise FileNotFoundError(
            f"{run_dir}: no checkpoints/epoch_* (was the run trained with --checkpointing_steps epoch?)"
        )
    return load_file(os.path.join(epochs[-1], "model.safetensors"))


def _convert(job: EvalJob, scope: str, sparsity: float, state: dict[str, torch.Tensor]) -> timm_prune.PrunableModel:
    config = timm_prune.PruneConfig(method=job.method, sparsity=sparsity, scope=scope, **job.options)
    pm = timm_prune.convert(create_model(job.model, job.model_kwargs), config)
    # A saved model holds the plain timm weights only; the method's training state (if any) starts fresh.
    pm.load_state_dict(state, strict=job.weights == "checkpoint")
    if job.bf16:
        pm = pm.to(memory_format=torch.channels_last)
    return pm.eval()


def run_eval_job(job: EvalJob) -> list[dict[str, Any]]:
    """Top-1 of every (scope, sparsity, variant) of the job; one row each, with the dense top-1 beside it."""
    unknown = sorted(set(job.variants) - set(VARIANTS))
    if unknown:
        raise ValueError(f"{job.run}: unknown variant(s) {unknown}; known: {list(VARIANTS)}")
    torch.set_num_threads(job.threads)
    started = time.time()
    state = dense_checkpoint(job.run_dir) if job.weights == "checkpoint" else saved_weights(job.run_dir)
    pm = _convert(job, job.scopes[0], job.sparsities[0], state)
    (images, labels), (bn_images, _) = load_eval_tensors(job.data, pm, job.split)
    if job.bf16:
        images, bn_images = (t.contiguous(memory_format=torch.channels_last) for t in (images, bn_images))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=job.bf16):
        return _evaluate_grid(job, state, images, labels, bn_images, started)


def _pruned(
    job: EvalJob, scope: str, sparsity: float, state: dict, bn_batches: list, bias_correction: bool = False
) -> tuple[timm_prune.PrunableModel, Any]:
    """The run's model pruned at (scope, sparsity), and prune()'s report."""
    pm = _convert(job, scope, sparsity, state)
    if pm.pruner.needs_calibration:
        # One-shot methods (Wanda, SparseGPT) calibrate on the same un-augmented training images that BatchNorm
        # re-estimation uses.
        pm.calibrate(bn_batches)
    if bias_correction:
        return pm, pm.prune(bias_correction_batches=bn_batches, num_batches=len(bn_batches))
    return pm, pm.prune()


def _evaluate_grid(job: EvalJob, state: dict, images: torch.Tensor, labels: torch.Tensor, bn_images, started):
    pm = _convert(job, job.scopes[0], job.sparsities[0], state)
    dense = top1(pm, images, labels)
    bn_batches = split_batches(bn_images, job.data.batch_size, job.bn_batches)
    rows = []
    for scope in job.scopes:
        for sparsity in job.sparsities:
            pm, report = _pruned(job, scope, sparsity, state, bn_batches)
            measured = {"zero": top1(pm, images, labels)}
            for kind in DATA_FREE:
                if kind in job.variants:
                    pm.recover(kind)
                    measured[kind] = top1(pm, images, labels)
            if "bn_recal" in job.variants:
                pm.recover("none")
                pm.recalibrate_batchnorm(bn_batches, num_batches=len(bn_batches))
                measured["bn_recal"] = top1(pm, images, labels)
            if "mean+bn_recal" in job.variants:
                pm.recover("mean")  # recalibrate_batchnorm resets the statistics before estimating them again
                pm.recalibrate_batchnorm(bn_batches, num_batches=len(bn_batches))
                measured["mean+bn_recal"] = top1(pm, images, labels)
            if "bias" in job.variants:  # a fresh model: prune() has dropped the dense weights the correction needs
                pm, _ = _pruned(job, scope, sparsity, state, bn_batches, bias_correction=True)
                measured["bias"] = top1(pm, images, labels)
            for variant, value in measured.items():
                if variant in job.variants:
                    rows.append(
                        {
                            "run": job.run,
                            "method": job.method,
                            "scope": scope,
                            "sparsity": sparsity,
                            "measured_sparsity": round(report.sparsity, 5),
                            "variant": variant,
                            "split": job.split,
                            "top1": round(100 * value, 2),
                            "dense_top1": round(100 * dense, 2),
                        }
                    )
    print(f"[eval] {job.run} on {job.split}: {len(rows)} rows in {time.time() - started:.0f} s", flush=True)
    return rows


# ---------------------------------------------------------------------------------------------- checks
def dead_weight_fraction(model: nn.Module, images: torch.Tensor, labels: torch.Tensor) -> float:
    """Fraction of the default-targeted weights that get exactly zero gradient on ``images``.

    Weights whose every input is padding (e.g. outer kernel taps on 1x1 maps) never train and prune for free,
    which flatters any magnitude criterion; the benchmark's input size must leave (almost) none.
    """
    targets = timm_prune.convert(model, timm_prune.PruneConfig(method="magnitude")).targets
    model.train()
    model.zero_grad()
    F.cross_entropy(model(images), labels).backward()
    dead = sum(int((m.weight.grad == 0).sum()) for m in targets.values())
    total = sum(m.weight.numel() for m in targets.values())
    model.zero_grad()
    return dead / total


def fresh_dead_weight_fraction(name: str, model_kwargs: dict[str, Any], img_size: int, batch: int = 64) -> float:
    """Dead weights of a freshly initialised model at ``img_size`` (zero-initialised BatchNorm gammas set to 1, so
    that the residual branches pass gradient as they do once trained)."""
    torch.manual_seed(0)
    model = create_model(name, model_kwargs)
    for module in model.modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and module.weight is not None:
            nn.init.ones_(module.weight)
    x = torch.randn(batch, 3, img_size, img_size)
    return dead_weight_fraction(model, x, torch.randint(0, 10, (batch,)))


def step_time_ratio(
    name: str,
    model_kwargs: dict[str, Any],
    images: torch.Tensor,
    labels: torch.Tensor,
    pof_options: dict[str, Any],
    steps: int = 60,
    warmup: int = 4,
    method: str = "pof",
    bf16: bool = False,
    device: str = "cpu",
) -> dict[str, float]:
    """Training-step time of POF (B) over plain training (A) on identical batches, interleaved: the median of the
    ratios of adjacent steps.

    Both start from the same initial weights and use the recipe's optimizer; the order alternates every step
    (A B, B A, ...) so that drifts of a shared, noisy machine hit both alike. ``bf16``: both under bfloat16 autocast
    with channels-last tensors, as the v2 benchmark trains. ``device``: where both train (on CUDA every step is
    synchronised before its clock stops, so the time is the kernels' and not the launches').
    """
    torch.manual_seed(0)
    base = create_model(name, model_kwargs)
    state = base.state_dict()
    plain = create_model(name, model_kwargs)
    plain.load_state_dict(state)
    models = {
        "A": timm_prune.convert(plain, timm_prune.PruneConfig(method="magnitude")),
        "B": timm_prune.convert(base, timm_prune.PruneConfig(method=method, **pof_options)),
    }
    models = {k: m.to(device) for k, m in models.items()}
    images, labels = images.to(device), labels.to(device)
    if bf16:
        models = {k: m.to(memory_format=torch.channels_last) for k, m in models.items()}
        images = images.contiguous(memory_format=torch.channels_last)
    device_type = torch.device(device).type
    synchronize = torch.cuda.synchronize if device_type == "cuda" else (lambda: None)
    optimizers = {
        k: create_optimizer_v2(m, opt="sgd", lr=0.01, weight_decay=5e-4, momentum=0.9) for k, m in models.items()
    }
    times: dict[str, list[float]] = {"A": [], "B": []}
    for step in range(warmup + steps):
        for key in ("A", "B") if step % 2 == 0 else ("B", "A"):
            model, optimizer = models[key], optimizers[key]
            model.train()
            synchronize()
            start = time.perf_counter()
            with torch.autocast(device_type, dtype=torch.bfloat16, enabled=bf16):
                loss = F.cross_entropy(model(images), labels) + model.penalty()
            loss.backward()
            optimizer.step()
            model.on_step_end(step=step + 1, total_steps=warmup + steps)  # GMP's mask updates count too
            optimizer.zero_grad()
            synchronize()
            if step >= warmup:
                times[key].append(time.perf_counter() - start)
    median_a, median_b = statistics.median(times["A"]), statistics.median(times["B"])
    # Each B step against the A step next to it in time (same load on a shared machine), then the median.
    paired = statistics.median(b / a for a, b in zip(times["A"], times["B"], strict=True))
    return {
        "median_step_s_plain": median_a,
        "median_step_s_pof": median_b,
        "step_time_ratio": paired,
        "ratio_of_medians": median_b / median_a,
        # The mean counts the candidate re-selection steps too (every threshold_refresh-th step).
        "mean_step_time_ratio": sum(times["B"]) / sum(times["A"]),
        "steps": steps,
        "batch_size": len(images),
    }
