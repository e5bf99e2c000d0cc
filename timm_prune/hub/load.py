"""Loading a saved pruned model: locating it (local directory or Hub), reading and checking every file, and
rebuilding the timm model with its weights. Returns plain data (``SavedState``); ``timm_prune.from_pretrained``
wraps it into a ``PrunableModel`` and puts the pruning state (masks, recovery, report) back.

Only safetensors and JSON are read; pickle checkpoints are refused (see ``files``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch

from ..config import RECOVERIES, PruneConfig
from ..registry import list_methods
from ..structured.record import apply_structure
from . import card
from .codec import decode_compact, decode_recovery
from .files import (
    CONFIG_NAME,
    PRUNING_CONFIG_NAME,
    RECOVERY_KINDS,
    RECOVERY_NAME,
    SAVE_FORMATS,
    SCHEMA_VERSION,
    FileFormatError,
    HubUnreachableError,
    SavedState,
    is_pickle_name,
    open_safetensors,
    read_json,
    read_tensors,
    refuse_pickles,
    state_dict_mismatch,
    transport_errors,
)


@dataclass
class Source:
    directory: str  # local directory holding the files (a Hub snapshot folder for repos)
    where: str  # how errors name it
    repo_id: str | None = None
    revision: str | None = None


def _split_id(model_id: str | os.PathLike, revision: str | None) -> tuple[str, bool | None, str | None]:
    """``(id or path, is_remote: True/False/None=guess, revision)`` from the accepted spellings."""
    text = os.fspath(model_id)
    if text.startswith("local-dir:"):
        return text[len("local-dir:") :], False, revision
    remote: bool | None = None
    if text.startswith("hf-hub:"):
        text, remote = text[len("hf-hub:") :], True
    if "@" in text and (remote or not os.path.exists(text)):
        text, at = text.split("@", 1)
        if revision is not None and revision != at:
            raise ValueError(f"from_pretrained: revision given twice ({at!r} in the id, {revision!r} as argument)")
        revision, remote = at, True
    return text, remote, revision


def locate(
    model_id: str | os.PathLike,
    revision: str | None,
    *,
    weights: bool = True,
    token: str | bool | None = None,
    cache_dir: str | os.PathLike | None = None,
    local_files_only: bool = False,
) -> Source:
    text, remote, revision = _split_id(model_id, revision)
    if remote is None:
        remote = not os.path.exists(text) and card.is_repo_id(text)
    if not remote:
        if os.path.isfile(text):
            if is_pickle_name(text):
                refuse_pickles([os.path.basename(text)], f"the path {text}", os.path.dirname(text) or ".")
            raise ValueError(f"from_pretrained expects a directory or a Hub id; {text} is a file")
        if not os.path.isdir(text):
            raise FileNotFoundError(f"from_pretrained: no directory {text} (and it is not a Hub id 'user/name')")
        if not os.path.isfile(os.path.join(text, PRUNING_CONFIG_NAME)):
            refuse_pickles(os.listdir(text), f"the directory {text}", text)
        return Source(text, f"directory {text}")
    return _download(text, revision, weights, token, cache_dir, local_files_only)


def _download(
    repo_id: str,
    revision: str | None,
    weights: bool,
    token: str | bool | None,
    cache_dir: str | os.PathLike | None,
    local_files_only: bool,
) -> Source:
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    at = f"{repo_id}@{revision}" if revision else repo_id

    def fetch(filename: str) -> str:
        try:
            return hf_hub_download(
                repo_id,
                filename,
                revision=revision,
                token=token,
                cache_dir=cache_dir,
                local_files_only=local_files_only,
            )
        except RepositoryNotFoundError:
            raise FileNotFoundError(f"Hub repo {repo_id!r} not found (or private without a token)") from None
        except RevisionNotFoundError:
            raise FileNotFoundError(f"Hub repo {repo_id!r} has no revision {revision!r}") from None
        except LocalEntryNotFoundError as e:  # raised when the Hub is unreachable and the cache lacks the file
            raise HubUnreachableError(at, f"{filename} is not reachable and not in the local cache ({e})") from e
        except EntryNotFoundError:
            if filename == PRUNING_CONFIG_NAME or filename.endswith(".safetensors"):
                _refuse_remote_pickles(repo_id, revision, token)
            raise FileFormatError(
                filename, f"missing from Hub repo {at}; it is not a timm_prune model (stock timm may load it)"
            ) from None
        except HfHubHTTPError as e:
            raise HubUnreachableError(at, f"the Hub answered an error for {filename}: {e}") from e
        except transport_errors() as e:
            raise HubUnreachableError(at, f"{type(e).__name__}: {e}") from e

    pruning_path = fetch(PRUNING_CONFIG_NAME)
    directory = os.path.dirname(pruning_path)
    fetch(CONFIG_NAME)
    if weights:
        pruning = read_pruning_config(directory)
        fetch(pruning["weights_file"])
        if pruning.get("report"):
            fetch(RECOVERY_NAME)
    return Source(directory, f"Hub repo {at}", repo_id, revision)


def _refuse_remote_pickles(repo_id: str, revision: str | None, token: str | bool | None) -> None:
    from huggingface_hub import HfApi

    try:
        names = HfApi(token=token).list_repo_files(repo_id, revision=revision)
    except Exception:  # only to improve the message; the caller raises its own error anyway
        return
    refuse_pickles(names, f"Hub repo {repo_id}")


def read_pruning_config(directory: str) -> dict[str, Any]:
    pruning = read_json(os.path.join(directory, PRUNING_CONFIG_NAME))
    version = pruning.get("schema_version")
    if version != SCHEMA_VERSION:
        raise FileFormatError(
            PRUNING_CONFIG_NAME,
            f"unknown schema_version {version!r}; this timm_prune reads version {SCHEMA_VERSION} "
            f"(saved with timm_prune {pruning.get('library_version', '?')}: upgrade timm_prune to load it)",
        )
    config = pruning.get("config")
    if not isinstance(config, dict):
        raise FileFormatError(PRUNING_CONFIG_NAME, "has no 'config' object")
    if config.get("method") not in list_methods():
        raise FileFormatError(
            PRUNING_CONFIG_NAME,
            f"unknown pruning method {config.get('method')!r}; registered methods: {list_methods()} "
            "(import the package that registers it before loading)",
        )
    if pruning.get("save_format") not in SAVE_FORMATS or pruning.get("weights_file") != SAVE_FORMATS.get(
        pruning.get("save_format")
    ):
        raise FileFormatError(
            PRUNING_CONFIG_NAME,
            f"save_format {pruning.get('save_format')!r} / weights_file {pruning.get('weights_file')!r} are not "
            f"one of {SAVE_FORMATS}",
        )
    kinds = pruning.get("recovery_kinds") or []
    if not isinstance(kinds, list) or not set(kinds) <= set(RECOVERY_KINDS):
        raise FileFormatError(PRUNING_CONFIG_NAME, f"recovery_kinds {kinds!r} not within {list(RECOVERY_KINDS)}")
    return pruning


def read_timm_config(directory: str) -> dict[str, Any]:
    config = read_json(os.path.join(directory, CONFIG_NAME))
    for key in ("architecture", "num_classes"):
        if key not in config:
            raise FileFormatError(CONFIG_NAME, f"has no {key!r} (not a timm config)")
    return config


def read_pruning_info(
    model_id: str | os.PathLike, revision: str | None = None, **hub_kwargs: Any
) -> tuple[dict[str, Any], dict[str, Any], str]:
    """``(pruning_config.json, config.json, where)`` of a saved model, without its weights (CLI ``info``)."""
    source = locate(model_id, revision, weights=False, **hub_kwargs)
    pruning = read_pruning_config(source.directory)
    timm_config = read_timm_config(source.directory)
    weights = os.path.join(source.directory, pruning["weights_file"])
    if os.path.isfile(weights):  # a local save (or a cached download): a truncated file is an error here too
        open_safetensors(weights)  # the header only; safetensors checks it covers the whole file
    return pruning, timm_config, source.where


def load_state(source: Source, recover: bool | str) -> SavedState:
    """Every file of ``source`` read and checked: the timm model (narrowed if structured, weights loaded, on
    CPU) and the pruning state; ``recovery`` is the kind ``recover`` resolves to."""
    import timm

    directory = source.directory
    pruning = read_pruning_config(directory)
    timm_config = read_timm_config(directory)
    try:
        prune_config = PruneConfig.from_dict(pruning["config"])
    except (TypeError, ValueError) as e:
        raise FileFormatError(PRUNING_CONFIG_NAME, f"invalid 'config': {e}") from None
    kind = _resolve_recovery(pruning, recover)

    weights_name = pruning["weights_file"]
    weights_path = os.path.join(directory, weights_name)
    if not os.path.isfile(weights_path):
        refuse_pickles(os.listdir(directory), source.where, directory)
    tensors, metadata = read_tensors(weights_path)
    compact_masks: dict[str, torch.Tensor] = {}
    if pruning["save_format"] == "compact":
        tensors, compact_masks = decode_compact(tensors, metadata, weights_name)

    # timm's own reader of config.json, so the model is configured exactly as stock timm would configure it.
    model = timm.create_model(f"local-dir:{directory}", pretrained=False)
    structure = pruning.get("structure")
    if structure is not None:  # a structured method narrowed the model: rebuild that before the weights load
        try:
            apply_structure(model, structure)
        except (AttributeError, TypeError, ValueError, RuntimeError) as e:
            raise FileFormatError(PRUNING_CONFIG_NAME, f"its 'structure' does not fit the architecture ({e})") from e
    problems = state_dict_mismatch(model.state_dict(), tensors)
    if problems:
        raise FileFormatError(
            weights_name, f"does not fit {timm_config['architecture']!r} of {CONFIG_NAME}: {problems}"
        )
    dtypes = {t.dtype for t in tensors.values() if t.is_floating_point()}
    if len(dtypes) == 1 and dtypes != {torch.float32}:
        model.to(dtypes.pop())  # keep a half-precision save in half precision
    model.load_state_dict(tensors, strict=True)
    state = SavedState(
        model=model,
        config=prune_config,
        report=pruning.get("report") or None,
        recovery=kind,
        metrics=dict(pruning.get("metrics") or {}),
        structure=structure,
        base_model=pruning.get("base_model"),
    )
    if structure is None and state.report is not None:
        state.masks, state.recovery_stats = _read_masks(pruning, directory, tensors, compact_masks, weights_name)
    return state


def _resolve_recovery(pruning: dict[str, Any], recover: bool | str) -> str:
    if pruning.get("structure") is not None and recover in (True, False, None, "none"):
        return "none"  # removed channels leave nothing to recover
    if recover is True:
        kind = card.default_recovery(pruning)
    elif recover is False or recover is None:
        kind = "none"
    elif isinstance(recover, str) and recover in RECOVERIES:
        kind = recover
    else:
        raise ValueError(f"from_pretrained(recover=...) must be True, False or one of {list(RECOVERY_KINDS)}")
    if kind != "none" and pruning.get("report") and kind not in pruning.get("recovery_kinds", []):
        raise FileFormatError(
            RECOVERY_NAME, f"holds no tensors for recovery {kind!r}; available: {pruning.get('recovery_kinds')}"
        )
    if kind != "none" and not pruning.get("report"):
        raise ValueError(f"from_pretrained(recover={recover!r}): the saved model was never pruned")
    return kind


def _read_masks(
    pruning: dict[str, Any],
    directory: str,
    tensors: dict[str, torch.Tensor],
    compact_masks: dict[str, torch.Tensor],
    weights_name: str,
) -> tuple[dict[str, torch.Tensor], dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]]]:
    """Keep-masks and recovery statistics of the report's layers, checked against the loaded weights."""
    try:
        names = [row["name"] for row in pruning["report"]["layers"]]
    except (KeyError, TypeError) as e:
        raise FileFormatError(PRUNING_CONFIG_NAME, f"malformed 'report' ({e})") from None
    # Layers the weights lack are left to the caller, which names them against the layers the config targets.
    shapes = {name: tuple(tensors[f"{name}.weight"].shape) for name in names if f"{name}.weight" in tensors}
    recovery, _ = read_tensors(os.path.join(directory, RECOVERY_NAME))
    stats, packed_keeps = decode_recovery(recovery, shapes, pruning.get("recovery_kinds") or [], RECOVERY_NAME)
    masks = {}
    for name in shapes:
        weight = tensors[f"{name}.weight"]
        keep = compact_masks.get(f"{name}.weight", packed_keeps.get(name))
        if keep is None:  # files written by other tools: the zero pattern is the mask
            keep = weight != 0
        outside = int((weight[~keep] != 0).sum())
        if outside:
            raise FileFormatError(weights_name, f"layer {name!r} has {outside} non-zero weights where it is pruned")
        masks[name] = keep
    return masks, stats
