"""Tensor encodings of the saved files: packed keep-masks, the compact weights file, the recovery tensors.

Pure functions from tensors to tensors (and back, checked), so that save and load share one definition.
"""

from __future__ import annotations

import json
from collections.abc import Iterable

import numpy as np
import torch

from .files import FileFormatError

# Key suffixes of one pruned tensor in the compact file: its kept values in storage order, and its keep-mask
# as np.packbits bytes. The tensor's shape is in the file's metadata.
_KEPT = ":kept"
_MASK = ":mask"
_KEEP_KEY = ".keep"  # packed keep-mask of a layer in the recovery file (dense format only)


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
