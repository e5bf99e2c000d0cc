"""Writing a saved pruned model: every file computed and checked in memory, then moved into place at once.

A saved model is a directory (or Hub repo) that three readers understand:

- ``config.json`` + ``model.safetensors``: a plain timm model whose pruned weights are exactly 0. Stock
  ``timm.create_model("hf-hub:..."/"local-dir:...", pretrained=True)`` and transformers'
  ``AutoModelForImageClassification`` (TimmWrapper) load it unchanged.
- ``pruning_config.json`` + ``mean_recovery.safetensors``: what ``timm_prune.from_pretrained`` adds back
  (the pruning config, masks, per-layer report, metrics and the data-free recovery tensors).
- ``README.md`` (+ ``pruning_plot.png``): the model card.

``save_format="compact"`` replaces ``model.safetensors`` by ``model_compact.safetensors`` (kept values + bit
mask), which only timm_prune reads. Loading never unpickles: safetensors and JSON only.

This module writes plain data (``SavedState``: a timm model, dicts and tensors); ``PrunableModel.save_pretrained``
builds that state and calls it, so the hub package never imports the model wrapper.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from typing import Any

import torch
from safetensors.torch import save_file

from .._version import __version__
from ..structured.record import apply_structure
from . import card
from .codec import encode_compact, encode_recovery
from .files import (
    CARD_NAME,
    CONFIG_NAME,
    OWN_FILES,
    PLOT_NAME,
    PRUNING_CONFIG_NAME,
    RECOVERY_KINDS,
    RECOVERY_NAME,
    SAVE_FORMATS,
    SCHEMA_VERSION,
    SavedState,
    state_dict_mismatch,
)


# ================================================================================================ save
def save_pretrained(
    state: SavedState,
    save_directory: str | os.PathLike,
    save_format: str = "dense",
    *,
    base_model: str | None = None,
    model_args: dict[str, Any] | None = None,
    repo_id: str | None = None,
    card_template: str | os.PathLike | None = None,
    data_config: dict[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    pretrained: bool | None = None,
) -> str:
    """Write ``state`` to ``save_directory`` (files in the module docstring); returns the directory.

    Everything is computed and checked in memory first, then written into a temporary directory beside the
    target and moved into place, so a failure leaves no half-written model behind.

    Args:
        save_format: ``"dense"`` (readable by stock timm and transformers) or ``"compact"`` (kept values +
            bit mask; timm_prune only).
        base_model: Hub id of the model this one was pruned from (card metadata); default: the timm
            ``pretrained_cfg["hf_hub_id"]`` of the wrapped model.
        model_args: extra ``timm.create_model`` arguments needed to rebuild the architecture, for
            changes timm's factory did not record (it records ``img_size``, ``in_chans`` and the like).
        repo_id: the Hub id used in the card's usage snippets (``push_to_hub`` passes it).
        card_template: a Jinja model-card template replacing ``timm_prune/hub/templates/model_card.md``.
        data_config: the preprocessing the model was trained / evaluated with (timm's ``resolve_data_config``
            keys: ``input_size``, ``crop_pct``, ``crop_mode``, ``interpolation``, ``mean``, ``std``). It replaces
            the architecture's defaults in ``config.json``'s ``pretrained_cfg``, which is what stock
            ``timm.data.resolve_data_config``, transformers' ``TimmWrapperImageProcessor`` and
            ``timm-prune eval`` read. Default: the model's own ``pretrained_cfg``.
        label_names: one name per class (timm's ``label_names``; transformers' ``id2label``); ignored unless
            there is one per output class.
        pretrained: ``False``: the weights did not start from the architecture's pretrained checkpoint, so
            ``config.json`` names no checkpoint tag and ``base_model`` defaults to none. ``None``: unknown
            (the model's ``pretrained_cfg`` is trusted).
    """
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"save_pretrained: {target} exists and is not a directory")
    data = {"data_config": data_config, "label_names": label_names, "pretrained": pretrained}
    writers = _prepare(
        state, save_format, base_model, model_args, repo_id or _placeholder_repo(target), card_template, **data
    )
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    try:
        # mkdtemp makes a private (0700) folder; a model is meant to be shared: the user's umask decides.
        umask = _umask()
        os.chmod(staging, 0o777 & ~umask)
        for name, write in writers.items():
            write(os.path.join(staging, name))
            os.chmod(os.path.join(staging, name), 0o666 & ~umask)
        _move_into_place(staging, target, set(writers))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


def _umask() -> int:
    mask = os.umask(0o022)  # reading the umask means setting it; put it straight back
    os.umask(mask)
    return mask


def _placeholder_repo(target: str) -> str:
    return f"<user>/{os.path.basename(target.rstrip(os.sep)) or 'model'}"


def _move_into_place(staging: str, target: str, names: set[str]) -> None:
    if not os.path.exists(target):
        os.rename(staging, target)  # one atomic step: the directory appears complete or not at all
        return
    # An existing directory may hold the user's other files: replace ours one by one (each os.replace is
    # atomic; only renames remain at this point) and drop our files this save does not rewrite.
    for name in sorted(names):
        os.replace(os.path.join(staging, name), os.path.join(target, name))
    for name in OWN_FILES:
        if name not in names and os.path.isfile(os.path.join(target, name)):
            os.remove(os.path.join(target, name))


def _prepare(
    state: SavedState,
    save_format: str,
    base_model: str | None,
    model_args: dict[str, Any] | None,
    repo_id: str,
    card_template: str | os.PathLike | None,
    data_config: dict[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    pretrained: bool | None = None,
) -> dict[str, Callable[[str], None]]:
    """Everything save_pretrained writes, computed and validated; returns ``{filename: writer(path)}``."""
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {sorted(SAVE_FORMATS)}; got {save_format!r}")
    merged = state.model  # only read below
    state_dict = _cpu_state_dict(merged)
    timm_config = _timm_config(merged, model_args, data_config, label_names, pretrained)
    _check_rebuild(timm_config, state_dict, state.structure)

    masks = {name: keep.detach().cpu() for name, keep in state.masks.items()}
    for name, keep in masks.items():
        weight = state_dict[f"{name}.weight"]
        if bool((weight[~keep] != 0).any()):  # merge_and_unload guarantees this; a broken method would not
            raise RuntimeError(f"save_pretrained: layer {name!r} has non-zero weights outside its keep-mask")
    stats = {name: state.recovery_stats[name] for name in masks if name in state.recovery_stats}
    kinds = sorted({kind for by_kind in stats.values() for kind in by_kind if kind in RECOVERY_KINDS})
    cfg = getattr(merged, "pretrained_cfg", {}) or {}
    if base_model is None:
        base_model = state.base_model or (None if pretrained is False else cfg.get("hf_hub_id"))

    pruning = {
        "schema_version": SCHEMA_VERSION,
        "library": "timm_prune",
        "library_version": __version__,
        "base_model": base_model,
        "architecture": timm_config["architecture"],
        "save_format": save_format,
        "weights_file": SAVE_FORMATS[save_format],
        "config": state.config.to_dict(),
        "report": state.report,
        "recovery": state.recovery if state.report is not None else "none",
        "recovery_kinds": kinds,
        "metrics": _jsonable(dict(state.metrics), "metrics"),
    }
    if state.structure is not None:
        pruning["structure"] = _jsonable(state.structure, "structure")
    pruning_text = json.dumps(pruning, indent=2, allow_nan=False) + "\n"
    config_text = json.dumps(timm_config, indent=2) + "\n"
    readme = card.render_card(
        repo_id=repo_id,
        architecture=timm_config["architecture"],
        pruning=pruning,
        save_format=save_format,
        plot_name=PLOT_NAME,
        template=card_template,
    )
    plot = card.render_plot(pruning["report"], pruning["metrics"])

    if save_format == "compact":
        tensors, metadata = encode_compact(state_dict, {f"{n}.weight": k for n, k in masks.items()})
        recovery = encode_recovery(stats, None)  # the compact file carries the masks
    else:
        tensors, metadata = state_dict, {"format": "pt"}  # transformers insists on format=pt
        recovery = encode_recovery(stats, masks)
    return {
        CONFIG_NAME: _text_writer(config_text),
        SAVE_FORMATS[save_format]: lambda path: save_file(tensors, path, metadata=metadata),
        PRUNING_CONFIG_NAME: _text_writer(pruning_text),
        RECOVERY_NAME: lambda path: save_file(recovery, path, metadata={"format": "pt", "timm_prune": "recovery"}),
        CARD_NAME: _text_writer(readme),
        PLOT_NAME: lambda path: _write_bytes(path, plot),
    }


def _text_writer(text: str) -> Callable[[str], None]:
    return lambda path: _write_bytes(path, text.encode("utf-8"))


def _write_bytes(path: str, data: bytes) -> None:
    with open(path, "wb") as f:
        f.write(data)


def _cpu_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    seen: set[int] = set()
    for key, value in model.state_dict().items():
        tensor = value.detach().cpu().contiguous()
        # safetensors refuses tensors sharing memory (tied weights); the loaders copy each key anyway.
        ptr = tensor.untyped_storage().data_ptr()
        if ptr in seen and tensor.numel():
            tensor = tensor.clone()
        seen.add(ptr)
        out[key] = tensor
    return out


# pretrained_cfg entries that describe the architecture's published checkpoint, not the saved weights.
_CHECKPOINT_KEYS = ("tag", "hf_hub_id", "url", "file", "license", "origin_url", "paper_ids", "paper_name", "notes")
_DATA_CONFIG_KEYS = ("input_size", "crop_pct", "crop_mode", "interpolation", "mean", "std")


def _timm_config(
    model: torch.nn.Module,
    model_args: dict[str, Any] | None,
    data_config: dict[str, Any] | None = None,
    label_names: Sequence[str] | None = None,
    pretrained: bool | None = None,
) -> dict[str, Any]:
    """timm's own config.json for ``model``, made loadable by transformers as well.

    ``data_config`` (the preprocessing actually used) replaces the architecture's defaults in
    ``pretrained_cfg``; ``label_names`` go where timm and transformers read them (top level: timm moves them
    into ``pretrained_cfg`` on load, transformers makes ``id2label`` of them).

    timm writes ``num_classes`` both at the top level and in ``model_args``; transformers' TimmWrapper passes
    ``num_classes=config.num_labels`` and ``**model_args`` to ``timm.create_model`` and fails with "multiple
    values for keyword argument 'num_classes'". timm reads the top-level value, so the copy is dropped.
    """
    from timm.models._hub import save_config_for_hf

    data = {k: data_config[k] for k in _DATA_CONFIG_KEYS if data_config and data_config.get(k) is not None}
    extra: dict[str, Any] = {}
    if label_names is not None and len(label_names) == getattr(model, "num_classes", None):
        extra["label_names"] = [str(name) for name in label_names]
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, CONFIG_NAME)
        save_config_for_hf(model, path, model_config=extra or None, model_args=model_args, data_config=data or None)
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    if pretrained is False:  # trained from scratch: the architecture's checkpoint was never used
        for key in _CHECKPOINT_KEYS:
            config["pretrained_cfg"].pop(key, None)
    args = config.get("model_args") or {}
    args.pop("num_classes", None)
    if args:
        config["model_args"] = args
    else:
        config.pop("model_args", None)
    return config


def _build_timm(config: dict[str, Any], device: str | torch.device | None = None) -> torch.nn.Module:
    import timm

    kwargs = dict(config.get("model_args") or {})
    with torch.device(device) if device is not None else contextlib.nullcontext():
        return timm.create_model(config["architecture"], pretrained=False, num_classes=config["num_classes"], **kwargs)


def _check_rebuild(
    config: dict[str, Any], state_dict: dict[str, torch.Tensor], structure: dict[str, Any] | None = None
) -> None:
    """The architecture config.json describes (narrowed by ``structure`` for structured methods) must take
    exactly these weights (else the loaders break)."""
    try:
        rebuilt = _build_timm(config, "meta")  # shapes only: no memory, no init cost
        if structure is not None:
            apply_structure(rebuilt, structure)
    except Exception as e:  # any timm factory failure means the config does not rebuild the model
        raise ValueError(
            f"save_pretrained: timm cannot rebuild {config['architecture']!r} from the config it would write "
            f"({type(e).__name__}: {e}); pass model_args={{...}} with the create_model arguments"
        ) from e
    problems = state_dict_mismatch(rebuilt.state_dict(), state_dict)
    if problems:
        raise ValueError(
            f"save_pretrained: {config['architecture']!r} rebuilt from config.json does not match the model's "
            f"weights ({problems}); pass model_args={{...}} with the create_model arguments that built it"
        )


def _jsonable(value: Any, where: str) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v, f"{where}[{k!r}]") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v, f"{where}[{i}]") for i, v in enumerate(value)]
    if hasattr(value, "item") and callable(value.item):  # 0-dim tensors, numpy scalars
        value = value.item()
    if value is None or isinstance(value, (bool, int, str)):
        return value
    if isinstance(value, float):
        if value != value or value in (float("inf"), float("-inf")):
            raise ValueError(f"save_pretrained: {where} is {value}, which JSON cannot store")
        return value
    raise ValueError(f"save_pretrained: {where} has a {type(value).__name__}, which JSON cannot store")
