"""Which modules get pruned: PEFT-style ``target_modules`` / ``exclude_modules`` matching.

A pattern is either a regex string (full match against the module's qualified name) or a list of
strings, each an exact module name or a name suffix on a ``.`` boundary (``"qkv"`` matches
``blocks.0.attn.qkv``). With no ``target_modules`` every Conv2d and Linear is a target except the
stem conv and the classifier, which timm names in the model's ``pretrained_cfg``.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable

import torch.nn as nn

SUPPORTED_TYPES: tuple[type[nn.Module], ...] = (nn.Conv2d, nn.Linear)


@functools.cache
def _conv_forwards() -> frozenset:
    forwards = {nn.Conv2d.forward}
    try:  # timm's TF-style "same" padding conv keeps the weight as stored
        from timm.layers.conv2d_same import Conv2dSame

        forwards.add(Conv2dSame.forward)
    except ImportError:  # pragma: no cover - timm always has it
        pass
    return frozenset(forwards)


@functools.cache
def _linear_forwards() -> frozenset:
    forwards = {nn.Linear.forward}
    try:
        from timm.layers import Linear as TimmLinear

        forwards.add(TimmLinear.forward)
    except ImportError:  # pragma: no cover
        pass
    return frozenset(forwards)


def weight_transformed_in_forward(module: nn.Module) -> bool:
    """True for layers whose forward changes the stored weight (e.g. StdConv2d's standardisation).

    Zeros written into such a weight are not zeros in the weight that runs, and recovery terms computed
    from the stored weight do not apply.
    """
    forward = type(module).forward
    if isinstance(module, nn.Conv2d):
        return forward not in _conv_forwards()
    if isinstance(module, nn.Linear):
        return forward not in _linear_forwards()
    return False


def matches(name: str, patterns: str | list[str] | None) -> bool:
    if patterns is None:
        return False
    if isinstance(patterns, str):
        return re.fullmatch(patterns, name) is not None
    return any(name == p or name.endswith("." + p) for p in patterns)


def _as_names(value: str | Iterable[str] | None) -> list[str]:
    if not value:
        return []
    if isinstance(value, str):
        return [value]
    return [v for v in value if v]


def default_exclusions(model: nn.Module) -> list[str]:
    """The stem conv and classifier names from timm's ``pretrained_cfg`` (empty without one)."""
    cfg = getattr(model, "pretrained_cfg", None) or getattr(model, "default_cfg", None) or {}
    return _as_names(cfg.get("first_conv")) + _as_names(cfg.get("classifier"))


def _under(name: str, prefixes: list[str]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in prefixes)


def _examples(model: nn.Module, limit: int = 12) -> str:
    names = [n for n, m in model.named_modules() if n and isinstance(m, SUPPORTED_TYPES)]
    if not names:
        names = [n for n, _ in model.named_modules() if n]
    shown = ", ".join(names[:limit])
    more = f", ... ({len(names) - limit} more)" if len(names) > limit else ""
    return shown + more


def find_targets(
    model: nn.Module,
    target_modules: str | list[str] | None = None,
    exclude_modules: str | list[str] | None = None,
) -> dict[str, nn.Module]:
    """Resolve the modules to prune, in ``named_modules`` order.

    Raises:
        ValueError: when nothing matches (the message lists module names that exist).
        TypeError: when ``target_modules`` explicitly names a module that is not a Conv2d or Linear.
    """
    stem_and_head = default_exclusions(model)
    targets: dict[str, nn.Module] = {}
    unsupported: list[str] = []
    for name, module in model.named_modules():
        if not name or matches(name, exclude_modules):
            continue
        if target_modules is None:
            if isinstance(module, SUPPORTED_TYPES) and not _under(name, stem_and_head):
                # Weight-standardising convs are left out unless asked for (see weight_transformed_in_forward).
                if not weight_transformed_in_forward(module):
                    targets[name] = module
        elif matches(name, target_modules):
            if isinstance(module, SUPPORTED_TYPES):
                targets[name] = module
            else:
                unsupported.append(f"{name} ({type(module).__name__})")
    if unsupported:
        raise TypeError(
            f"target_modules={target_modules!r} matched module(s) of an unsupported type: "
            f"{', '.join(unsupported[:8])}{' ...' if len(unsupported) > 8 else ''}. "
            f"Only {', '.join(t.__name__ for t in SUPPORTED_TYPES)} (and their subclasses) can be pruned; "
            "narrow the pattern to those layers (e.g. 'blocks.0.attn.qkv' instead of 'blocks.0.attn')."
        )
    if not targets:
        what = "the default targets (Conv2d/Linear minus stem and classifier)"
        if target_modules is not None:
            what = f"target_modules={target_modules!r}"
        raise ValueError(
            f"No module to prune: {what} with exclude_modules={exclude_modules!r} matched nothing in "
            f"{type(model).__name__}. Modules that exist: {_examples(model)}"
        )
    return targets
