"""Helpers of ``recipes/train.py``: loop state, an offline JSON-lines tracker, hashes, tables."""

from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
import shutil
from typing import Any

import timm
import torch
import torch.nn as nn
from accelerate.tracking import GeneralTracker


class TrainState:
    """Loop position and running sums, saved in every Accelerate checkpoint (``register_for_checkpointing``).

    Keeping the partial epoch sums here (not only the step count) makes a resumed run log, and pass to
    ``on_epoch_end``, the same epoch loss as an uninterrupted one: SLR's multiplier updates depend on it.
    """

    def __init__(self) -> None:
        self.completed_steps = 0  # optimizer steps so far
        self.epoch = 0  # the epoch in progress
        self.steps_in_epoch = 0  # optimizer steps done in that epoch
        self.loss_sum = 0.0
        self.penalty_sum = 0.0
        self.batches = 0
        self.history: list[dict[str, Any]] = []

    def start_epoch(self, epoch: int) -> None:
        self.epoch, self.steps_in_epoch, self.loss_sum, self.penalty_sum, self.batches = epoch, 0, 0.0, 0.0, 0

    def state_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(vars(self)))  # a deep copy of plain types

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.__dict__.update(json.loads(json.dumps(state)))


class JsonLinesTracker(GeneralTracker):
    """Offline Accelerate tracker: one JSON object per ``log`` call in ``<dir>/metrics.jsonl``."""

    name = "jsonl"
    requires_logging_directory = True
    main_process_only = True

    def __init__(self, logging_dir: str) -> None:
        super().__init__()
        # Nothing is written at construction: the output dir must not exist before arguments are validated.
        self.path = os.path.join(logging_dir, "metrics.jsonl")

    @property
    def tracker(self) -> JsonLinesTracker:
        return self

    def _write(self, record: dict[str, Any]) -> None:
        os.makedirs(os.path.dirname(self.path), exist_ok=True)
        with open(self.path, "a") as f:
            f.write(json.dumps(record, default=str) + "\n")

    def store_init_configuration(self, values: dict) -> None:
        self._write({"config": values})

    def log(self, values: dict, step: int | None = None, **kwargs: Any) -> None:
        self._write({"step": step, **values})


def check_model_name(name: str) -> None:
    """Fail before any work when timm does not know ``name`` (Hub and local-dir ids are checked on load)."""
    if name.startswith(("hf-hub:", "hf_hub:", "local-dir:")) or timm.is_model(name):
        return
    close = difflib.get_close_matches(name, timm.list_models(), n=5, cutoff=0.6)
    hint = f"; close names: {close}" if close else ""
    raise ValueError(
        f"--model {name!r} is not a timm model name{hint} (timm.list_models('*pattern*') lists them; "
        "Hub models are 'hf-hub:<repo id>')"
    )


def dataset_name(dataset: str) -> str:
    """How a run names its dataset: a local folder by its own name (not the relative path it was given),
    anything else (a Hub id, a built-in name) as given."""
    if os.path.exists(dataset):
        return os.path.basename(os.path.normpath(os.path.abspath(dataset))) or dataset
    return dataset


def tensors_sha256(tensors: dict[str, torch.Tensor]) -> str:
    digest = hashlib.sha256()
    for name in sorted(tensors):
        tensor = tensors[name].detach().cpu().contiguous()
        digest.update(name.encode())
        digest.update(str(tensor.dtype).encode())
        # numpy has no bfloat16; its bytes are those of the exact float32 widening.
        digest.update((tensor.float() if tensor.dtype == torch.bfloat16 else tensor).numpy().tobytes())
    return digest.hexdigest()


def batchnorm_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of every BatchNorm running statistic, to undo a re-estimation."""
    return {
        f"{name}.{buf_name}": buf.detach().clone()
        for name, module in model.named_modules()
        if isinstance(module, nn.modules.batchnorm._BatchNorm)
        for buf_name, buf in module.named_buffers(recurse=False)
        if buf is not None
    }


@torch.no_grad()
def restore_batchnorm_state(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    for key, value in state.items():
        module_name, buf_name = key.rsplit(".", 1)
        getattr(model.get_submodule(module_name), buf_name).copy_(value)


def _checkpoints_oldest_first(folder: str) -> list[os.DirEntry]:
    entries = [e for e in os.scandir(folder) if e.is_dir()] if os.path.isdir(folder) else []
    # Saving order; the step / epoch number breaks ties of coarse file-system clocks.
    return sorted(entries, key=lambda e: (e.stat().st_mtime, _trailing_int(e.name)))


def _trailing_int(name: str) -> int:
    tail = name.rsplit("_", 1)[-1]
    return int(tail) if tail.isdigit() else -1


def latest_checkpoint(output_dir: str) -> str:
    folder = os.path.join(output_dir, "checkpoints")
    entries = _checkpoints_oldest_first(folder)
    if not entries:
        raise ValueError(f"--resume_from_checkpoint latest: no checkpoint under {folder!r}")
    return entries[-1].path


def prune_checkpoints(folder: str, limit: int) -> list[str]:
    """Delete all but the newest ``limit`` checkpoint folders under ``folder``; returns the deleted paths."""
    entries = _checkpoints_oldest_first(folder)
    removed = [e.path for e in entries[: max(len(entries) - limit, 0)]]
    for path in removed:
        shutil.rmtree(path)
    return removed


# What a run writes into its output folder; a folder holding any of these holds an earlier run.
RUN_OUTPUTS = (
    "config.json",
    "model.safetensors",
    "model_compact.safetensors",
    "pruning_config.json",
    "mean_recovery.safetensors",
    "metrics.json",
    "logs",
    "checkpoints",
)


def check_output_dir(output_dir: str, resume: str | None, overwrite: bool) -> None:
    """transformers' examples rule: an output folder that already holds a run is refused unless this run
    resumes it or ``--overwrite_output_dir`` is given. Raises ``ValueError``; nothing is written.

    Files of the caller's own (a launcher's ``train.log``) do not count: only what a run writes does."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--output_dir {output_dir!r} exists and is not a directory")
    if resume or overwrite or not os.path.isdir(output_dir):
        return
    found = sorted(set(os.listdir(output_dir)) & set(RUN_OUTPUTS))
    if found:
        raise ValueError(
            f"--output_dir {output_dir!r} already holds a run ({', '.join(found)}); pass --overwrite_output_dir to "
            "write into it, --resume_from_checkpoint latest to continue it, or another --output_dir"
        )


def clear_previous_run(output_dir: str) -> None:
    """What an overwritten run must not inherit: the old run's log lines and checkpoints (``latest`` and
    ``--checkpoints_total_limit`` would count them). The saved model files are replaced when this run saves."""
    log = os.path.join(output_dir, "logs", "metrics.jsonl")
    if os.path.isfile(log):
        os.remove(log)
    shutil.rmtree(os.path.join(output_dir, "checkpoints"), ignore_errors=True)


def scalar_logs(values: dict[str, Any], prefix: str = "") -> dict[str, float]:
    """Numeric entries of ``values`` (trackers take scalars only)."""
    out = {}
    for key, value in values.items():
        if isinstance(value, torch.Tensor) and value.numel() == 1:
            value = value.item()
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[f"{prefix}{key}"] = value
    return out


def results_table(rows: list[tuple[str, float | None]], footer: str, title: str) -> str:
    width = max(len(name) for name, _ in rows)
    lines = [title, f"| {'model'.ljust(width)} | accuracy |", f"|{'-' * (width + 2)}|---------:|"]
    for name, accuracy in rows:
        shown = "n/a" if accuracy is None else f"{100 * accuracy:.2f}%"
        lines.append(f"| {name.ljust(width)} | {shown:>8} |")
    lines.append(footer)
    return "\n".join(lines)
