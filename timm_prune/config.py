"""`PruneConfig`: what to prune, how much, and with which method.

One object holds the fields every method shares (below) and the fields of the chosen method, which each
method declares as a small dataclass of its own (``methods/<name>.py``). Method fields are passed and
read as if they were attributes of the config (``PruneConfig(method="pof", penalty_warmup=100).penalty_warmup``),
and the JSON form is flat, so ``PruneConfig.from_dict(config.to_dict()) == config``.
"""

from __future__ import annotations

import dataclasses
import json
import os
from dataclasses import dataclass, field
from typing import Any

from .registry import get_method, list_methods

SCOPES = ("layer", "global")
# Data-free recoveries ``masking.recovery_statistics`` computes ("none" is the absence of one).
RECOVERY_KINDS = ("mean", "layer_mean", "renorm")
RECOVERIES = RECOVERY_KINDS + ("none",)
CONFIG_SCHEMA_VERSION = 1


def _check_patterns(name: str, value: Any) -> None:
    if value is None or isinstance(value, str):
        return
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return
    raise ValueError(
        f"PruneConfig.{name} must be None, a regex string, or a list of module names / name suffixes; "
        f"got {value!r} ({type(value).__name__})"
    )


@dataclass(init=False)
class PruneConfig:
    """Shared pruning settings plus the method's own fields.

    Args:
        method: registered method name (``timm_prune.list_methods()``), e.g. ``"pof"``.
        sparsity: fraction of the targeted weights removed by ``prune()``, in [0, 1).
        scope: ``"layer"`` prunes every targeted layer to ``sparsity``; ``"global"`` ranks all targeted
            weights together with one threshold, so layers end with different sparsities.
        target_modules: which modules to prune: a regex (full match on the module name) or a list of
            exact names / name suffixes, as in PEFT. ``None``: every Conv2d and Linear except the stem
            conv and the classifier (from the model's ``pretrained_cfg``).
        exclude_modules: same syntax; removed from the targets.
        penalty_weight: multiplier of the method's training penalty (``PrunableModel.penalty()``); ``None``: the
            method's own default (``default_penalty_weight``: 300 for POF, whose energy is a mean of fractions,
            1 for SLR).
        recovery: what ``recover()`` does after pruning: ``"mean"`` (pruned entries of each output unit
            act as their mean), ``"layer_mean"`` (one mean per layer), ``"renorm"`` (rescale each unit's
            kept weights to its former norm) or ``"none"``.
        **method_options: fields of the chosen method (see its options dataclass).

    Shared fields the method does not use (its ``PruneMethod.unused_fields``: AutoBot, which removes channels to
    a FLOPs target, has no use for ``sparsity``, ``scope``, ``recovery`` or ``penalty_weight``) are validated,
    then stored as ``None`` and left out of ``to_dict()``: a saved config names only what shaped the model.
    """

    method: str = "pof"
    sparsity: float | None = 0.5
    scope: str | None = "layer"
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    penalty_weight: float | None = None
    recovery: str | None = "mean"
    method_options: Any = field(default=None, repr=True)

    def __init__(
        self,
        method: str = "pof",
        sparsity: float = 0.5,
        scope: str = "layer",
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        penalty_weight: float | None = None,
        recovery: str = "mean",
        **method_options: Any,
    ) -> None:
        if not isinstance(method, str) or method not in list_methods():
            raise ValueError(f"PruneConfig.method must be one of {list_methods()}; got {method!r}")
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"PruneConfig.sparsity must be a number in [0, 1); got {sparsity!r}")
        if scope not in SCOPES:
            raise ValueError(f"PruneConfig.scope must be one of {list(SCOPES)}; got {scope!r}")
        _check_patterns("target_modules", target_modules)
        _check_patterns("exclude_modules", exclude_modules)
        if penalty_weight is None:
            penalty_weight = get_method(method).default_penalty_weight
        if isinstance(penalty_weight, bool) or not isinstance(penalty_weight, (int, float)) or penalty_weight < 0:
            raise ValueError(f"PruneConfig.penalty_weight must be a number >= 0; got {penalty_weight!r}")
        if recovery not in RECOVERIES:
            raise ValueError(f"PruneConfig.recovery must be one of {list(RECOVERIES)}; got {recovery!r}")
        self.method = method
        self.sparsity = float(sparsity)
        self.scope = scope
        self.target_modules = list(target_modules) if isinstance(target_modules, tuple) else target_modules
        self.exclude_modules = list(exclude_modules) if isinstance(exclude_modules, tuple) else exclude_modules
        self.penalty_weight = float(penalty_weight)
        self.recovery = recovery
        options_cls = get_method(method).options_cls
        known = {f.name for f in dataclasses.fields(options_cls)}
        unknown = sorted(set(method_options) - known)
        if unknown:
            raise ValueError(
                f"PruneConfig got unknown field(s) {unknown} for method {method!r}; "
                f"its fields are {sorted(known)} plus the shared ones {sorted(_shared_fields())}"
            )
        self.method_options = options_cls(**method_options)  # validates in __post_init__
        for name in get_method(method).unused_fields:
            setattr(self, name, None)

    def __getattr__(self, name: str) -> Any:
        # Only called when normal lookup fails: expose the method's fields as config attributes.
        options = self.__dict__.get("method_options")
        if options is not None and name in {f.name for f in dataclasses.fields(options)}:
            return getattr(options, name)
        raise AttributeError(f"PruneConfig has no field {name!r}")

    def to_dict(self) -> dict[str, Any]:
        unused = get_method(self.method).unused_fields
        out = {name: getattr(self, name) for name in _shared_fields() if name not in unused}
        out.update(dataclasses.asdict(self.method_options))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> PruneConfig:
        if not isinstance(data, dict):
            raise ValueError(f"PruneConfig.from_dict expects a dict; got {type(data).__name__}")
        return cls(**data)

    def to_json(self, path: str | os.PathLike | None = None) -> str:
        text = json.dumps(self.to_dict(), indent=2, sort_keys=True)
        if path is not None:
            tmp = f"{path}.tmp"
            with open(tmp, "w") as f:
                f.write(text + "\n")
            os.replace(tmp, path)
        return text

    @classmethod
    def from_json(cls, path_or_text: str | os.PathLike) -> PruneConfig:
        text = str(path_or_text)
        if not text.lstrip().startswith("{"):
            with open(path_or_text) as f:
                text = f.read()
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ValueError(f"PruneConfig.from_json: not valid JSON ({e})") from e
        return cls.from_dict(data)


def _shared_fields() -> list[str]:
    return [f.name for f in dataclasses.fields(PruneConfig) if f.name != "method_options"]
