"""Train a timm model with a pruning-friendly penalty, prune it without fine-tuning, evaluate, save.

    accelerate launch recipes/train.py                                   # built-in digits, a few minutes on CPU
    accelerate launch recipes/train.py --config recipes/configs/cifar10_resnet18_pof.yaml
    accelerate launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no \\
        --dynamo_backend no recipes/train.py                             # two CPU processes (gloo)

The same script runs on one process or many, on CPU or GPUs, with mixed precision from Accelerate's own
``--mixed_precision`` flag. Flags: ``python recipes/train.py --help``; any flag is also a YAML key.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import Any

import timm
import torch
import torch.nn.functional as F
from accelerate import Accelerator
from accelerate.utils import (
    DataLoaderConfiguration,
    ProjectConfiguration,
    gather_object,
    is_mps_available,
    is_npu_available,
    is_xpu_available,
    set_seed,
)
from recipe_args import parse_args, prune_config_from_args
from recipe_utils import (
    JsonLinesTracker,
    TrainState,
    batchnorm_state,
    check_model_name,
    check_output_dir,
    clear_previous_run,
    dataset_name,
    latest_checkpoint,
    prune_checkpoints,
    restore_batchnorm_state,
    results_table,
    scalar_logs,
    tensors_sha256,
)
from timm.optim import create_optimizer_v2
from timm.scheduler import create_scheduler_v2
from tqdm.auto import tqdm

import timm_prune
from timm_prune.data import (
    ImageClassificationDataset,
    create_loader,
    create_transforms,
    load_image_splits,
    tensor_datasets,
)


def _use_cpu(args: argparse.Namespace) -> bool:
    # Accelerator(cpu=True) is what makes a `--multi_gpu` launch on a CPU-only machine use gloo (DESIGN.md).
    if args.cpu or os.environ.get("ACCELERATE_USE_CPU", "").lower() in ("1", "true", "yes"):
        return True
    return not (torch.cuda.is_available() or is_xpu_available() or is_npu_available() or is_mps_available())


def _trackers(args: argparse.Namespace) -> list[Any]:
    names = {n.strip() for n in args.report_to.split(",") if n.strip()} - {"none"}
    if "all" in names:
        names = {"tensorboard", "jsonl"}
    unknown = names - {"tensorboard", "jsonl"}
    if unknown:
        raise ValueError(f"--report_to: unknown tracker(s) {sorted(unknown)}; use tensorboard, jsonl, all or none")
    out: list[Any] = ["tensorboard"] if "tensorboard" in names else []
    if "jsonl" in names:
        out.append(JsonLinesTracker(os.path.join(args.output_dir, "logs")))
    return out


@torch.no_grad()
def evaluate(model: torch.nn.Module, loader: Any, accelerator: Accelerator, desc: str = "eval") -> float:
    """Top-1 accuracy over the whole validation set, gathered from every process (duplicates dropped)."""
    model.eval()
    correct, total = 0, 0
    # A bar on the main process only: evaluating every variant of a large validation set takes minutes.
    for images, labels in tqdm(loader, desc=desc, leave=False, disable=not accelerator.is_local_main_process):
        predictions = model(images).argmax(dim=-1)
        predictions, labels = accelerator.gather_for_metrics((predictions, labels))
        correct += int((predictions == labels).sum())
        total += labels.numel()
    return correct / max(total, 1)


def use_tensor_pipeline(args: argparse.Namespace, splits: Any) -> bool:
    """--data_pipeline auto: the tensor pipeline when the decoded train split fits the memory bound."""
    if args.data_pipeline != "auto":
        return args.data_pipeline == "tensor"
    first = splits.train[0][splits.image_column]
    width, height = first.size if hasattr(first, "size") and not callable(first.size) else (0, 0)
    decoded_gb = 2 * 3 * width * height * (len(splits.train) + len(splits.validation)) / 1e9
    return 0 < decoded_gb <= args.tensor_pipeline_max_gb


def pruning_goal(config: timm_prune.PruneConfig) -> str:
    """What the run prunes to, in words: a FLOPs target, an N:M pattern, or a sparsity."""
    flops_target = getattr(config, "flops_target", None)
    if flops_target is not None:
        return f"to {flops_target:g} of the FLOPs" if flops_target < 1 else f"to {flops_target:g} MFLOPs"
    if getattr(config, "pattern", None):
        return f"at {config.pattern} sparsity"
    return f"at sparsity {config.sparsity:g}" if config.sparsity is not None else ""


def save_checkpoint(accelerator: Accelerator, args: argparse.Namespace, name: str) -> None:
    """``save_state`` into ``checkpoints/<name>``, then keep only the newest ``--checkpoints_total_limit``."""
    accelerator.save_state(os.path.join(args.output_dir, "checkpoints", name))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and args.checkpoints_total_limit is not None:
        prune_checkpoints(os.path.join(args.output_dir, "checkpoints"), args.checkpoints_total_limit)
    accelerator.wait_for_everyone()


def _fail(message: str) -> None:
    # A one-line error (no traceback) names the problem; every process exits the same way.
    print(f"error: {message}", file=sys.stderr, flush=True)
    raise SystemExit(2)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    started = time.time()
    try:
        trackers = _trackers(args)
        # Before Accelerator(): every process checks before any of them can write (its set-up waits for all).
        check_output_dir(args.output_dir, args.resume_from_checkpoint, args.overwrite_output_dir)
    except ValueError as e:
        _fail(str(e))
    accelerator = Accelerator(
        cpu=_use_cpu(args),
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        log_with=trackers or None,
        project_config=ProjectConfiguration(
            project_dir=args.output_dir,
            logging_dir=os.path.join(args.output_dir, "logs"),
            # Accelerate applies total_limit to its automatic names only; save_checkpoint() enforces it here.
            total_limit=args.checkpoints_total_limit,
        ),
        # Same shuffling on every process and after a resume: the order depends on (seed, epoch) only.
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )

    # ---- validate everything before the output dir exists or any training starts
    try:
        prune_config = prune_config_from_args(args)
        check_model_name(args.model)
        with accelerator.main_process_first():  # the main process downloads / caches first
            splits = load_image_splits(
                args.dataset,
                args.image_column,
                args.label_column,
                args.validation_fraction,
                args.seed if args.split_seed is None else args.split_seed,
                args.max_train_samples,
                args.max_eval_samples,
                args.validation_split,
            )
        num_classes = args.num_classes or splits.num_classes
        if num_classes < splits.num_classes:
            raise ValueError(f"--num_classes {num_classes} is below the dataset's {splits.num_classes} classes")
        set_seed(args.seed)  # before model creation: identical initial weights on every process
        try:
            model = timm.create_model(
                args.model, pretrained=args.pretrained, num_classes=num_classes, **args.model_kwargs
            )
        except Exception as e:  # bad model_kwargs, unreachable Hub weights, ...
            raise ValueError(f"--model {args.model!r} could not be created: {type(e).__name__}: {e}") from e
        model = timm_prune.convert(model, prune_config)
        if args.resume_from_checkpoint not in (None, "latest") and not os.path.isdir(args.resume_from_checkpoint):
            raise ValueError(f"--resume_from_checkpoint {args.resume_from_checkpoint!r}: no such directory")
    except ValueError as e:
        _fail(str(e))
    if args.push_to_hub:  # a run that will push checks the Hub now, not after training (every rank fails alike)
        problem = None
        if accelerator.is_main_process:
            try:
                timm_prune.hub.check_push_access(hub_repo_id(args), private=args.hub_private)
            except timm_prune.HubUnreachableError as e:
                problem = f"--push_to_hub: {e}"
        problem = next((p for p in gather_object([problem]) if p), None)
        if problem:
            _fail(problem)

    augment = {
        "none": args.augment == "none",
        "hflip": args.hflip,
        "scale": tuple(args.scale) if args.scale else None,
        "color_jitter": args.color_jitter,
    }
    train_tf, eval_tf, data_config = create_transforms(model, args.img_size, args.crop_pct, augment)
    if use_tensor_pipeline(args, splits):
        with accelerator.main_process_first():
            train_set, eval_set, bn_set = tensor_datasets(splits, data_config, augment, args.seed)
    else:
        image_col, label_col = splits.image_column, splits.label_column
        train_set = ImageClassificationDataset(splits.train, image_col, label_col, train_tf, seed=args.seed)
        eval_set = ImageClassificationDataset(splits.validation, image_col, label_col, eval_tf)
        bn_set = ImageClassificationDataset(splits.train, image_col, label_col, eval_tf)
    train_loader = create_loader(train_set, args.batch_size, True, args.num_workers)
    eval_loader = create_loader(eval_set, args.eval_batch_size or 2 * args.batch_size, False, args.num_workers)
    # BatchNorm re-estimation: the same un-sharded, un-augmented batches on every process, so the
    # re-estimated statistics (and everything evaluated with them) agree across ranks.
    bn_loader = create_loader(bn_set, args.batch_size, True, 0, generator=torch.Generator().manual_seed(args.seed))
    if args.channels_last:
        model = model.to(memory_format=torch.channels_last)

    if accelerator.is_main_process:
        if args.overwrite_output_dir and not args.resume_from_checkpoint:
            clear_previous_run(args.output_dir)  # an old run's log lines and checkpoints are not this run's
        os.makedirs(args.output_dir, exist_ok=True)
    accelerator.wait_for_everyone()
    run_config = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in vars(args).items()}
    accelerator.init_trackers("tensorboard", config=run_config)

    optimizer = create_optimizer_v2(
        model, opt=args.opt, lr=args.lr, weight_decay=args.weight_decay, momentum=args.momentum
    )
    model, optimizer, train_loader, eval_loader = accelerator.prepare(model, optimizer, train_loader, eval_loader)
    pm: timm_prune.PrunableModel = accelerator.unwrap_model(model)

    steps_per_epoch = math.ceil(len(train_loader) / args.gradient_accumulation_steps)
    total_steps = args.max_train_steps or args.epochs * steps_per_epoch
    num_epochs = math.ceil(total_steps / steps_per_epoch)
    scheduler, _ = create_scheduler_v2(
        optimizer,
        sched=args.sched,
        # Counted in optimizer steps (one "epoch" per update), so the schedule ends exactly at total_steps
        # even when --max_train_steps stops mid-epoch. --epochs 0 (no training) still builds one, unused.
        num_epochs=max(total_steps, 1),
        warmup_epochs=args.warmup_epochs * steps_per_epoch,
        min_lr=args.min_lr,
        step_on_epochs=False,
        updates_per_epoch=1,
    )
    state = TrainState()
    accelerator.register_for_checkpointing(state)

    if args.resume_from_checkpoint:
        path = args.resume_from_checkpoint
        if path == "latest":
            try:
                path = latest_checkpoint(args.output_dir)
            except ValueError as e:
                _fail(str(e))
        accelerator.print(f"resuming from {path}")
        accelerator.load_state(path)
        scheduler.step_update(num_updates=state.completed_steps)

    accelerator.print(
        f"{args.model} on {args.dataset} ({len(splits.train)} train / {len(splits.validation)} "
        f"{splits.validation_source} images, {num_classes} classes, input {data_config['input_size']}), "
        f"method {prune_config.method} {pruning_goal(prune_config)}, {len(pm.targets)} target layers, "
        f"{accelerator.num_processes} process(es) on {accelerator.device}, {total_steps} optimizer steps"
    )
    progress = tqdm(
        total=total_steps, initial=state.completed_steps, disable=not accelerator.is_local_main_process, desc="train"
    )
    stop_now = False
    for epoch in range(state.epoch, num_epochs):
        if state.completed_steps >= total_steps:
            break
        resuming_mid_epoch = epoch == state.epoch and state.steps_in_epoch > 0
        if not resuming_mid_epoch:
            state.start_epoch(epoch)
        model.train()
        train_set.set_epoch(epoch)
        train_loader.set_epoch(epoch)
        active_loader = train_loader
        if resuming_mid_epoch:
            skip = state.steps_in_epoch * args.gradient_accumulation_steps
            active_loader = accelerator.skip_first_batches(train_loader, skip)
        for images, labels in active_loader:
            with accelerator.accumulate(model):
                loss = F.cross_entropy(model(images), labels)
                penalty = pm.penalty()
                accelerator.backward(loss + penalty)
                optimizer.step()
                # The method's per-step hook (PSAP's pruning schedule), once per optimizer step on every process,
                # before zero_grad so that a method may read the synchronised gradients.
                step_logs = {}
                if accelerator.sync_gradients:
                    step_logs = pm.on_step_end(step=state.completed_steps + 1, total_steps=total_steps)
                optimizer.zero_grad()
            state.loss_sum += loss.item()
            state.penalty_sum += penalty.item()
            state.batches += 1
            if not accelerator.sync_gradients:
                continue
            state.completed_steps += 1
            state.steps_in_epoch += 1
            scheduler.step_update(num_updates=state.completed_steps)
            progress.update(1)
            progress.set_postfix(loss=f"{loss.item():.3f}", penalty=f"{penalty.item():.4f}")
            if step_logs:
                accelerator.log(scalar_logs(step_logs), step=state.completed_steps)
            step_checkpoint = args.checkpointing_steps not in (None, "epoch")
            if step_checkpoint and state.completed_steps % int(args.checkpointing_steps) == 0:
                save_checkpoint(accelerator, args, f"step_{state.completed_steps}")
                if args.stop_after_step is not None and state.completed_steps >= args.stop_after_step:
                    stop_now = True
                    break
            if state.completed_steps >= total_steps:
                break
        if stop_now:
            break

        # ---- epoch end: global averages, the method's epoch update, validation, logs
        sums = accelerator.reduce(
            torch.tensor([state.loss_sum, state.penalty_sum, state.batches], device=accelerator.device), "sum"
        )
        train_loss, train_penalty = (sums[:2] / sums[2].clamp_min(1)).tolist()
        # Every rank gets the same global loss, so methods that decide on it (SLR) decide alike everywhere.
        method_logs = pm.on_epoch_end(train_loss=train_loss)
        energy = pm.candidate_energy()
        accuracy = evaluate(model, eval_loader, accelerator)
        record = {
            "epoch": epoch,
            "step": state.completed_steps,
            "lr": optimizer.param_groups[0]["lr"],
            "train_loss": train_loss,
            "penalty": train_penalty,
            "candidate_energy_mean": sum(energy.values()) / max(len(energy), 1),
            "candidate_energy_max": max(energy.values(), default=0.0),
            "val_accuracy": accuracy,
            # Methods namespace their own keys ("slr/k"); bare ones get the method's name.
            **{k if "/" in k else f"{prune_config.method}/{k}": v for k, v in scalar_logs(method_logs).items()},
        }
        state.history.append(record)
        state.start_epoch(epoch + 1)
        accelerator.log(record, step=record["step"])
        if accelerator.is_local_main_process:
            # Penalty and candidate energy only for methods that have them (AutoBot trains its weights plainly).
            penalty_text = f" penalty {train_penalty:.5f}" if (prune_config.penalty_weight or 0) > 0 else ""
            energy_text = f" candidate energy {record['candidate_energy_mean']:.4f}" if energy else ""
            progress.write(
                f"epoch {epoch}: loss {train_loss:.4f}{penalty_text}{energy_text} val acc {100 * accuracy:.2f}%"
            )
        if args.checkpointing_steps == "epoch":
            save_checkpoint(accelerator, args, f"epoch_{epoch}")
    progress.close()

    if stop_now:
        accelerator.print(f"stopped after the checkpoint at step {state.completed_steps} (--stop_after_step)")
        accelerator.wait_for_everyone()
        accelerator.end_training()
        return
    finish(args, accelerator, model, pm, eval_loader, bn_loader, state, started, splits, data_config)


def finish(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    pm: timm_prune.PrunableModel,
    eval_loader: Any,
    bn_loader: Any,
    state: TrainState,
    started: float,
    splits: Any,
    data_config: dict[str, Any],
) -> None:
    """Prune, evaluate every variant, check ranks agree, save (and push) from the main process."""
    accuracy = {"dense": evaluate(pm, eval_loader, accelerator, "eval dense")}
    structured = pm.pruner.structured
    if pm.pruner.needs_calibration:
        # Methods that prepare prune() on data (AutoBot trains its gates) do it on the trained model, on the same
        # un-sharded batches on every process, so every rank prunes the same way.
        batch_size = pm.pruner.calibration_batch_size or args.batch_size
        calibration_batches = create_loader(
            bn_loader.dataset, batch_size, True, 0, generator=torch.Generator().manual_seed(args.seed)
        )
        total = getattr(pm.config, "num_batches", None) or getattr(pm.config, "calibration_batches", None)
        with tqdm(
            desc=f"calibrate ({pm.config.method})", total=total, disable=not accelerator.is_local_main_process
        ) as bar:
            logs = pm.calibrate(_counted(_repeat(calibration_batches), bar))
        # Per-step series (AutoBot: loss, ce, flops_ratio, mean_gate) as first -> last; scalars as they are.
        series = {k: v for k, v in logs.items() if isinstance(v, list) and v}
        steps = max((len(v) for v in series.values()), default=0)
        summary = [f"{k} {v[0]:.3f} -> {v[-1]:.3f}" for k, v in series.items()]
        summary += [f"{k} {v}" for k, v in logs.items() if k not in series]
        accelerator.print(f"calibration ({pm.config.method}): {steps} steps" + "".join(f", {s}" for s in summary))
    report = pm.prune()
    accuracy["pruned"] = evaluate(pm, eval_loader, accelerator, "eval pruned")
    # Recovery fills masked entries; a structured method leaves none (its channels are gone).
    recovery = "none" if structured else pm.config.recovery
    if recovery != "none":
        pm.recover()
        accuracy["recovered"] = evaluate(pm, eval_loader, accelerator, "eval recovered")
    # The data-using reference: BatchNorm statistics re-estimated for the pruned (unrecovered) weights.
    # It is undone afterwards: the saved model is the data-free one (pruned + the configured recovery).
    saved_bn = batchnorm_state(pm)
    pm.recover("none")
    bn_used = pm.recalibrate_batchnorm(bn_loader, num_batches=args.bn_batches)
    accuracy["bn_recalibrated"] = evaluate(pm, eval_loader, accelerator, "eval BN re-estimated") if bn_used else None
    restore_batchnorm_state(pm, saved_bn)
    if recovery != "none":
        pm.recover()

    mask_hash = tensors_sha256(pm.masks)
    weight_hash = tensors_sha256(pm.merge_and_unload().state_dict())
    rank, world = accelerator.process_index, accelerator.num_processes
    print(f"[rank {rank}/{world}] world_size={world} masks_sha256={mask_hash} weights_sha256={weight_hash}", flush=True)
    all_hashes = gather_object([(mask_hash, weight_hash)])
    if len(set(all_hashes)) != 1:
        raise RuntimeError(f"processes disagree on the pruned model: {all_hashes}")

    metrics = {f"accuracy_{name}": value for name, value in accuracy.items()}
    metrics.update(dataset=dataset_name(args.dataset), num_processes=world)
    rows = [("dense (trained)", accuracy["dense"]), ("pruned", accuracy["pruned"])]
    if recovery != "none":
        rows.append((f"pruned + {recovery} recovery", accuracy.get("recovered")))
    bn_row = f"pruned + BN re-estimated ({bn_used} batches)" if bn_used else "pruned + BN (no BatchNorm)"
    rows.append((bn_row, accuracy["bn_recalibrated"]))
    if structured:
        metrics.update(flops_ratio=report.flops_ratio, params_after=report.params_after, speedup=report.speedup)
        flops_target = getattr(pm.config, "flops_target", None)  # PSAP may target a share of filters instead
        goal = f"to {flops_target:g} of the FLOPs" if flops_target else f"at {pm.config.sparsity:g} of the filters"
        title = f"{args.model} / {args.dataset} / {pm.config.method} {goal}"
        speedup = f", CPU latency x{report.speedup:.2f}" if report.speedup else ""
        footer = (
            f"FLOPs {100 * report.flops_ratio:.2f}% of dense, params {report.params_before:,} -> "
            f"{report.params_after:,}{speedup}"
        )
    else:
        metrics.update(sparsity=report.sparsity)
        title = f"{args.model} / {args.dataset} / {pm.config.method} at {100 * pm.config.sparsity:.0f}% sparsity"
        footer = f"measured sparsity of the targeted weights: {100 * report.sparsity:.2f}%"
    pm.metrics.update(metrics)
    table = results_table(rows, footer, title)
    hub_url = push_error = None
    if accelerator.is_main_process:
        # model_args: create_model kwargs timm's config.json would not record (e.g. a ViT's patch_size).
        model_args = args.model_kwargs or None
        # What the model was trained with goes into config.json's pretrained_cfg (timm, transformers and
        # `timm-prune eval` read it); a model trained from scratch names no ImageNet checkpoint.
        save_kwargs = {
            "model_args": model_args,
            "data_config": data_config,
            "label_names": splits.class_names,
            "pretrained": bool(args.pretrained),
        }
        pm.save_pretrained(args.output_dir, **save_kwargs)
        if args.push_to_hub:
            try:
                hub_url = pm.push_to_hub(hub_repo_id(args), private=args.hub_private, **save_kwargs)
            except timm_prune.HubUnreachableError as e:  # every local output is kept; the table still prints
                push_error = " ".join(str(e).split())  # one line, whatever the HTTP error's text
        summary = {
            "final": metrics,
            "history": state.history,
            "prune_report": report.to_dict(),
            "prune_config": pm.config.to_dict(),
            "args": {k: v for k, v in vars(args).items()},
            "world_size": world,
            "masks_sha256": mask_hash,
            "weights_sha256": weight_hash,
            "train_images": len(splits.train),
            "validation_images": len(splits.validation),
            "wall_time_s": round(time.time() - started, 1),
            "hub_url": hub_url,
            "hub_error": push_error,
        }
        with open(os.path.join(args.output_dir, "metrics.json"), "w") as f:
            json.dump(summary, f, indent=2, default=str)
    accelerator.log({**scalar_logs(metrics, prefix="final/")}, step=state.completed_steps)
    accelerator.print(f"\n{table}\nsaved to {args.output_dir}" + (f", pushed: {hub_url}" if hub_url else ""))
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if push_error:
        print(
            f"error: the push failed ({push_error}); the model is saved in {args.output_dir}; retry with: "
            f"timm-prune push {args.output_dir} {hub_repo_id(args)}",
            file=sys.stderr,
            flush=True,
        )
        raise SystemExit(1)


def hub_repo_id(args: argparse.Namespace) -> str:
    return args.hub_model_id or os.path.basename(os.path.normpath(args.output_dir))


def _counted(batches: Any, bar: Any) -> Any:
    """``batches``, ticking ``bar`` once per batch the method takes."""
    for batch in batches:
        yield batch
        bar.update(1)


def _repeat(loader: Any) -> Any:
    """Batches of ``loader``, epoch after epoch (gate training may want more steps than one epoch has)."""
    while True:
        yield from loader


if __name__ == "__main__":
    main()
