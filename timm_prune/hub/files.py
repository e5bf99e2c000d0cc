"""On-disk formats of a saved pruned model: names, validation, the compact encoding, recovery tensors.

Everything here reads safetensors and JSON only. Nothing in this package ever calls ``torch.load`` or
``pickle``: a checkpoint in a pickle format is refused, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open

from .masking import RECOVERY_KINDS  # noqa: F401  (re-exported: what from_pretrained(recover=...) can apply)

CONFIG_NAME = "config.json"
DENSE_WEIGHTS_NAME = "model.safetensors"
COMPACT_WEIGHTS_NAME = "model_compact.safetensors"
PRUNING_CONFIG_NAME = "pruning_config.json"
RECOVERY_NAME = "mean_recovery.safetensors"
CARD_NAME = "README.md"
PLOT_NAME = "pruning_plot.png"
# Every file save_pretrained may write: a new save removes the ones it does not rewrite (a dense save must
# not leave a stale compact file behind, and vice versa).
OWN_FILES = (
    CONFIG_NAME,
    DENSE_WEIGHTS_NAME,
    COMPACT_WEIGHTS_NAME,
    PRUNING_CONFIG_NAME,
    RECOVERY_NAME,
    CARD_NAME,
    PLOT_NAME,
)
SAVE_FORMATS = {"dense": DENSE_WEIGHTS_NAME, "compact": COMPACT_WEIGHTS_NAME}
SCHEMA_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".pkl", ".pickle", ".ckpt")

# Key suffixes of one pruned tensor in the compact file: its kept values in storage order, and its keep-mask
# as np.packbits bytes. The tensor's shape is in the file's metadata.
_KEPT = ":kept"
_MASK = ":mask"
_KEEP_KEY = ".keep"  # packed keep-mask of a layer in the recovery file (dense format only)


class FileFormatError(ValueError):
    """A saved file is missing, unreadable or inconsistent; the message names the file and the problem."""

    def __init__(self, filename: str, problem: str) -> None:
        super().__init__(f"{filename}: {problem}")
        self.filename = filename
        self.problem = problem


class HubUnreachableError(OSError):
    """The Hub could not be reached (or the repo read) for ``repo_id``."""

    def __init__(self, repo_id: str, detail: str) -> None:
        super().__init__(f"could not load {repo_id!r} from the Hugging Face Hub: {detail}")
        self.repo_id = repo_id


def is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def refuse_pickles(names: Iterable[str], where: str) -> None:
    """Raise when the only checkpoints on offer are pickles (called once the safetensors file is missing)."""
    pickles = sorted(n for n in names if is_pickle_name(n))
    if pickles:
        raise FileFormatError(
            ", ".join(pickles),
            f"{where} has only pickle checkpoint(s); timm_prune loads safetensors and JSON only and never "
            "unpickles (unpickling runs arbitrary code). Convert the weights to model.safetensors with a tool you "
            "trust, or save the model again with PrunableModel.save_pretrained.",
        )


def read_json(path: str) -> dict[str, Any]:
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileFormatError(name, f"missing from {os.path.dirname(path) or '.'}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(name, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FileFormatError(name, f"expected a JSON object, found {type(data).__name__}")
    return data


def open_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``(lazy handle, metadata)`` of a safetensors file, with a clear error for a truncated or corrupt one."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileFormatError(name, f"missing from {os.path.dirname(path) or '.'}")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise FileFormatError(
            name, f"not a readable safetensors file ({e}); it is truncated or corrupt: save or download it again"
        ) from None
    return handle, handle.metadata() or {}


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    handle, metadata = open_safetensors(path)
    try:
        return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    except SafetensorError as e:  # pragma: no cover - the header check above catches truncation
        raise FileFormatError(os.path.basename(path), f"cannot read tensor data ({e})") from None


# ---------------------------------------------------------------------------------------------- bit masks
def pack_mask(keep: torch.Tensor) -> torch.Tensor:
    """Keep-mask -> uint8 tensor of ``ceil(numel / 8)`` bytes (np.packbits, big-endian bit order)."""
    return torch.from_numpy(np.packbits(keep.detach().cpu().reshape(-1).numpy().astype(np.bool_)))


def unpack_mask(packed: torch.Tensor, shape: list[int] | tuple[int, ...], filename: str, key: str) -> torch.Tensor:
    numel = int(np.prod(shape)) if len(shape) else 1
    if packed.dtype != torch.uint8 or packed.dim() != 1 or packed.numel() != (numel + 7) // 8:
        raise FileFormatError(
            filename,
            f"mask {key!r} has {packed.numel()} bytes of {packed.dtype}; a mask for shape {list(shape)} "
            f"needs {(numel + 7) // 8} uint8 bytes",
        )
    bits = np.unpackbits(packed.numpy(), count=numel).astype(np.bool_)
    return torch.from_numpy(bits).reshape(tuple(shape))


# ---------------------------------------------------------------------------------------------- compact
def encode_compact(
    state_dict: dict[str, torch.Tensor], masks: dict[str, torch.Tensor]
) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Pruned weights as kept values + packed mask; everything else unchanged. ``masks``: param key -> keep."""
    tensors: dict[str, torch.Tensor] = {}
    shapes: dict[str, list[int]] = {}
    for key, value in state_dict.items():
        keep = masks.get(key)
        if keep is None:
            tensors[key] = value
            continue
        keep = keep.to(value.device)
        tensors[key + _KEPT] = value[keep].contiguous()
        tensors[key + _MASK] = pack_mask(keep)
        shapes[key] = list(value.shape)
    metadata = {"format": "pt", "timm_prune_format": "compact", "shapes": json.dumps(shapes)}
    return tensors, metadata


def decode_compact(
    tensors: dict[str, torch.Tensor], metadata: dict[str, str], filename: str
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Inverse of ``encode_compact``: ``(dense state dict, masks by param key)``."""
    if metadata.get("timm_prune_format") != "compact":
        raise FileFormatError(filename, "metadata does not mark it as a timm_prune compact file")
    try:
        shapes = json.loads(metadata.get("shapes", "{}"))
    except json.JSONDecodeError as e:
        raise FileFormatError(filename, f"metadata 'shapes' is not valid JSON ({e})") from None
    state_dict: dict[str, torch.Tensor] = {}
    masks: dict[str, torch.Tensor] = {}
    for key, value in tensors.items():
        if key.endswith(_MASK):
            continue
        if not key.endswith(_KEPT):
            state_dict[key] = value
            continue
        name = key[: -len(_KEPT)]
        if name not in shapes or name + _MASK not in tensors:
            raise FileFormatError(filename, f"pruned tensor {name!r} lacks its shape or mask")
        keep = unpack_mask(tensors[name + _MASK], shapes[name], filename, name + _MASK)
        if int(keep.sum()) != value.numel():
            raise FileFormatError(
                filename,
                f"pruned tensor {name!r}: the mask keeps {int(keep.sum())} entries but {value.numel()} "
                "values are stored",
            )
        dense = torch.zeros(tuple(shapes[name]), dtype=value.dtype)
        dense[keep] = value
        state_dict[name] = dense
        masks[name] = keep
    return state_dict, masks


# ---------------------------------------------------------------------------------------------- recovery
def encode_recovery(
    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], masks: dict[str, torch.Tensor] | None
) -> dict[str, torch.Tensor]:
    """Per layer and recovery kind, the tensors that differ from the no-op (mean 0, scale 1).

    Keys: ``<layer>.<kind>.mean`` / ``<layer>.<kind>.scale`` and, when ``masks`` is given (dense format, where
    the mask would otherwise have to be guessed from the zero pattern), ``<layer>.keep`` as packed bits.
    """
    out: dict[str, torch.Tensor] = {}
    for layer, by_kind in stats.items():
        for kind, (mean, scale) in by_kind.items():
            if bool((mean != 0).any()) or kind in ("mean", "layer_mean"):
                out[f"{layer}.{kind}.mean"] = mean.detach().float().cpu().contiguous()
            if bool((scale != 1).any()) or kind == "renorm":
                out[f"{layer}.{kind}.scale"] = scale.detach().float().cpu().contiguous()
    for layer, keep in (masks or {}).items():
        out[layer + _KEEP_KEY] = pack_mask(keep)
    return out


def decode_recovery(
    tensors: dict[str, torch.Tensor],
    layers: dict[str, tuple[int, ...]],
    kinds: Iterable[str],
    filename: str,
) -> tuple[dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]], dict[str, torch.Tensor]]:
    """``(stats by layer and kind, packed-mask-decoded keeps by layer)`` for the given layer weight shapes."""
    stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
    keeps: dict[str, torch.Tensor] = {}
    known = set()
    for layer, shape in layers.items():
        n_out = shape[0]
        stats[layer] = {}
        for kind in kinds:
            mean_key, scale_key = f"{layer}.{kind}.mean", f"{layer}.{kind}.scale"
            known.update((mean_key, scale_key))
            mean = tensors.get(mean_key, torch.zeros(n_out))
            scale = tensors.get(scale_key, torch.ones(n_out))
            for key, t in ((mean_key, mean), (scale_key, scale)):
                if tuple(t.shape) != (n_out,):
                    raise FileFormatError(
                        filename, f"tensor {key!r} has shape {list(t.shape)}; layer {layer!r} has {n_out} outputs"
                    )
            stats[layer][kind] = (mean.float(), scale.float())
        keep_key = layer + _KEEP_KEY
        known.add(keep_key)
        if keep_key in tensors:
            keeps[layer] = unpack_mask(tensors[keep_key], shape, filename, keep_key)
    unknown = sorted(set(tensors) - known)
    if unknown:
        raise FileFormatError(
            filename,
            f"tensor(s) for layers the model does not prune: {unknown[:5]}{' ...' if len(unknown) > 5 else ''}",
        )
    return stats, keeps


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k!r} is {list(found[k].shape)} but the architecture needs {list(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if wrong:
        parts.append("shape mismatch: " + "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else ""))
    if missing:
        parts.append(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return "; ".join(parts)
