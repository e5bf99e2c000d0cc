"""The structure record: what a channel removal changed in a model, as JSON, and how to replay it.

``structure_diff`` records every module attribute that changed (``in_channels``, ``normalized_shape``, ...)
and the shape of every tensor; ``apply_structure`` narrows a freshly built model to it before the weights
load (``pruning_config.json`` stores the record under ``"structure"``).
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn

# Module attribute types a channel removal may change (and so must be recorded for rebuild).
_SIMPLE = (bool, int, float, str)


def snapshot(model: nn.Module) -> dict[str, dict[str, Any]]:
    """Plain attributes of every module (what a channel removal may change), for ``structure_diff``."""
    out = {}
    for name, module in model.named_modules():
        attrs = {}
        for key, value in vars(module).items():
            if key.startswith("_") or key == "training":
                continue
            if isinstance(value, _SIMPLE) or (
                isinstance(value, (tuple, list)) and all(isinstance(v, _SIMPLE) for v in value)
            ):
                attrs[key] = list(value) if isinstance(value, tuple) else value
        out[name] = attrs
    return out


def structure_diff(before: dict[str, dict[str, Any]], model: nn.Module) -> dict[str, Any]:
    """JSON-able record of what changed: ``{"modules": {name: {attr: value}}, "tensors": {key: shape}}``.

    Applied to a freshly built model by ``apply_structure``; tensor shapes are recorded for every parameter
    and buffer so that the load is checked with ``load_state_dict(strict=True)``.
    """
    after = snapshot(model)
    modules = {}
    for name, attrs in after.items():
        changed = {k: v for k, v in attrs.items() if before.get(name, {}).get(k, object()) != v}
        if changed:
            modules[name] = changed
    tensors = {key: list(value.shape) for key, value in model.state_dict().items()}
    return {"modules": modules, "tensors": tensors}


def apply_structure(model: nn.Module, structure: dict[str, Any]) -> nn.Module:
    """Narrow a freshly built ``model`` in place to the recorded structure (attributes, then tensor shapes)."""
    for name, attrs in structure.get("modules", {}).items():
        module = model.get_submodule(name) if name else model
        for key, value in attrs.items():
            old = getattr(module, key, None)
            setattr(module, key, tuple(value) if isinstance(old, tuple) and isinstance(value, list) else value)
    state = model.state_dict(keep_vars=True)
    for key, shape in structure.get("tensors", {}).items():
        if key not in state:
            raise ValueError(f"structure record names {key!r}, which {type(model).__name__} does not have")
        tensor = state[key]
        if list(tensor.shape) == list(shape):
            continue
        owner_name, _, attr = key.rpartition(".")
        owner = model.get_submodule(owner_name) if owner_name else model
        new = torch.zeros(shape, dtype=tensor.dtype, device=tensor.device)
        if isinstance(tensor, nn.Parameter):
            setattr(owner, attr, nn.Parameter(new, requires_grad=tensor.requires_grad))
        else:
            owner._buffers[attr] = new
    return model
