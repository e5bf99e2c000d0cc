"""Save, load and share pruned models: ``save_pretrained``, ``from_pretrained``, ``push_to_hub``.

A saved model is a directory (or Hub repo) that three readers understand:

- ``config.json`` + ``model.safetensors``: a plain timm model whose pruned weights are exactly 0. Stock
  ``timm.create_model("hf-hub:..."/"local-dir:...", pretrained=True)`` and transformers'
  ``AutoModelForImageClassification`` (TimmWrapper) load it unchanged.
- ``pruning_config.json`` + ``mean_recovery.safetensors``: what ``timm_prune.from_pretrained`` adds back
  (the pruning config, masks, per-layer report, metrics and the data-free recovery tensors).
- ``README.md`` (+ ``pruning_plot.png``): the model card.

``save_format="compact"`` replaces ``model.safetensors`` by ``model_compact.safetensors`` (kept values + bit
mask), which only timm_prune reads. Loading never unpickles: safetensors and JSON only.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import torch
from safetensors.torch import save_file

from . import _hub_card as card
from ._hub_files import (
    CARD_NAME,
    CONFIG_NAME,
    OWN_FILES,
    PLOT_NAME,
    PRUNING_CONFIG_NAME,
    RECOVERY_KINDS,
    RECOVERY_NAME,
    SAVE_FORMATS,
    SCHEMA_VERSION,
    FileFormatError,
    HubUnreachableError,
    encode_compact,
    encode_recovery,
    state_dict_mismatch,
)
from ._hub_load import load_directory, locate, read_pruning_config, read_timm_config, transport_errors

if TYPE_CHECKING:
    from .model import PrunableModel


# ================================================================================================ save
def save_pretrained(
    pm: PrunableModel,
    save_directory: str | os.PathLike,
    save_format: str = "dense",
    *,
    base_model: str | None = None,
    model_args: dict[str, Any] | None = None,
    repo_id: str | None = None,
    card_template: str | os.PathLike | None = None,
) -> str:
    """Write ``pm`` to ``save_directory`` (files in the module docstring); returns the directory.

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
        card_template: a Jinja model-card template replacing ``hub_cards/model_card.md``.
    """
    target = os.path.abspath(os.fspath(save_directory))
    if os.path.exists(target) and not os.path.isdir(target):
        raise NotADirectoryError(f"save_pretrained: {target} exists and is not a directory")
    writers = _prepare(pm, save_format, base_model, model_args, repo_id or _placeholder_repo(target), card_template)
    parent = os.path.dirname(target)
    os.makedirs(parent, exist_ok=True)
    staging = tempfile.mkdtemp(prefix=f".{os.path.basename(target)}.", suffix=".tmp", dir=parent)
    try:
        for name, write in writers.items():
            write(os.path.join(staging, name))
        _move_into_place(staging, target, set(writers))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return target


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
    pm: PrunableModel,
    save_format: str,
    base_model: str | None,
    model_args: dict[str, Any] | None,
    repo_id: str,
    card_template: str | os.PathLike | None,
) -> dict[str, Callable[[str], None]]:
    """Everything save_pretrained writes, computed and validated; returns ``{filename: writer(path)}``."""
    if save_format not in SAVE_FORMATS:
        raise ValueError(f"save_format must be one of {sorted(SAVE_FORMATS)}; got {save_format!r}")
    # Structured methods narrowed the model itself: nothing to fold, but the narrowing must be recorded.
    structure = getattr(pm.pruner, "structure", lambda: None)() if pm.pruner.structured and pm.is_pruned else None
    merged = pm.model if pm.pruner.structured else pm.merge_and_unload()  # only read below
    state_dict = _cpu_state_dict(merged)
    timm_config = _timm_config(merged, model_args)
    _check_rebuild(timm_config, state_dict, structure)

    masks = {name: keep.detach().cpu() for name, keep in pm.masks.items()} if pm.is_pruned else {}
    for name, keep in masks.items():
        weight = state_dict[f"{name}.weight"]
        if bool((weight[~keep] != 0).any()):  # merge_and_unload guarantees this; a broken method would not
            raise RuntimeError(f"save_pretrained: layer {name!r} has non-zero weights outside its keep-mask")
    stats = {name: pm._recovery_stats[name] for name in masks if name in pm._recovery_stats}
    kinds = sorted({kind for by_kind in stats.values() for kind in by_kind if kind in RECOVERY_KINDS})
    cfg = getattr(merged, "pretrained_cfg", {}) or {}
    if base_model is None:
        base_model = getattr(pm, "_hub_base_model", None) or cfg.get("hf_hub_id")
    from . import __version__

    pruning = {
        "schema_version": SCHEMA_VERSION,
        "library": "timm_prune",
        "library_version": __version__,
        "base_model": base_model,
        "architecture": timm_config["architecture"],
        "save_format": save_format,
        "weights_file": SAVE_FORMATS[save_format],
        "config": pm.config.to_dict(),
        "report": pm.last_report.to_dict() if pm.is_pruned else None,
        "recovery": pm.recovery if pm.is_pruned else "none",
        "recovery_kinds": kinds,
        "metrics": _jsonable(dict(pm.metrics), "metrics"),
    }
    if structure is not None:
        pruning["structure"] = _jsonable(structure, "structure")
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


def _timm_config(model: torch.nn.Module, model_args: dict[str, Any] | None) -> dict[str, Any]:
    """timm's own config.json for ``model``, made loadable by transformers as well.

    timm writes ``num_classes`` both at the top level and in ``model_args``; transformers' TimmWrapper passes
    ``num_classes=config.num_labels`` and ``**model_args`` to ``timm.create_model`` and fails with "multiple
    values for keyword argument 'num_classes'". timm reads the top-level value, so the copy is dropped.
    """
    from timm.models._hub import save_config_for_hf

    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, CONFIG_NAME)
        save_config_for_hf(model, path, model_args=model_args)
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
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
            from .structured import apply_structure

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


# ================================================================================================ load
def from_pretrained(
    model_id: str | os.PathLike,
    recover: bool | str = True,
    revision: str | None = None,
    *,
    device: str | torch.device = "cpu",
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> PrunableModel:
    """Load a model saved by ``save_pretrained`` / ``push_to_hub``, ready for inference (eval mode).

    Args:
        model_id: a local directory (optionally ``"local-dir:<path>"``), a Hub id ``"user/name"`` or
            ``"hf-hub:user/name"``, optionally with ``@revision``.
        recover: ``True``: the recovery active when the model was saved, else ``config.recovery``;
            ``False``: none (the pruned weights as stock timm sees them); or a kind: ``"mean"``,
            ``"layer_mean"``, ``"renorm"``, ``"none"``.
        revision: branch, tag or commit on the Hub.

    Raises:
        FileFormatError: (a ValueError) a file is missing, truncated, a pickle, of an unknown schema
            version or method, or does not match the architecture; the message names the file.
        HubUnreachableError: (an OSError) the Hub could not be reached; the message names the repo.
    """
    source = locate(model_id, revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    return load_directory(source, recover, device)


def read_pruning_info(
    model_id: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(pruning_config.json, config.json, where)`` of a saved model, without its weights (CLI ``info``)."""
    source = locate(model_id, revision, weights=False, **hub_kwargs)
    pruning = read_pruning_config(source.directory)
    return pruning, read_timm_config(source.directory), source.where


# ================================================================================================ push
def push_to_hub(
    pm: PrunableModel,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    save_format: str = "dense",
    token: str | bool | None = None,
    **save_kwargs: Any,
) -> str | None:
    """Save ``pm`` and upload it to ``repo_id`` in one commit; returns the commit URL.

    Runs on the main process only (Accelerate's ``PartialState``); other processes return ``None`` at once.
    ``save_kwargs`` go to ``save_pretrained`` (``base_model``, ``model_args``, ``card_template``).
    """
    if not _is_main_process():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(pm, os.path.join(tmp, "model"), save_format, repo_id=repo_id, **save_kwargs)
        if commit_message is None:
            architecture = (getattr(pm.model, "pretrained_cfg", None) or {}).get("architecture", "model")
            commit_message = f"Upload {architecture} pruned with timm_prune ({pm.config.method})"
        return push_folder(
            folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
        )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
) -> str:
    """Upload a directory written by ``save_pretrained`` (its timm_prune files only) in one commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = os.fspath(folder)
    pruning = read_pruning_config(folder)  # refuse to publish something from_pretrained would reject
    read_timm_config(folder)
    present = [name for name in OWN_FILES if os.path.isfile(os.path.join(folder, name))]
    for required in (pruning["weights_file"], CARD_NAME) + ((RECOVERY_NAME,) if pruning.get("report") else ()):
        if required not in present:
            raise FileFormatError(required, f"missing from {folder}; save the model again with save_pretrained")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        existing = set(api.list_repo_files(repo_id, revision=revision))
        operations: list[Any] = [CommitOperationAdd(name, os.path.join(folder, name)) for name in present]
        # A dense push must not leave an older compact file (or plot) behind, and vice versa.
        operations += [CommitOperationDelete(name) for name in OWN_FILES if name in existing and name not in present]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or "Upload timm_prune model",
            revision=revision,
        )
    except transport_errors() as e:  # HTTP errors (403, 404, ...) already name the repo: let them through
        raise HubUnreachableError(repo_id, f"{type(e).__name__}: {e}") from e
    return info.commit_url


def _is_main_process() -> bool:
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return True
    return PartialState().is_main_process


__all__ = [
    "FileFormatError",
    "HubUnreachableError",
    "from_pretrained",
    "push_folder",
    "push_to_hub",
    "read_pruning_info",
    "save_pretrained",
]
