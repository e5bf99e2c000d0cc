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
import re
from dataclasses import dataclass, field
from typing import Any

from .registry import get_method, list_methods

SCOPES = ("layer", "global", "lamp")
# Data-free recoveries ``masking.recovery_statistics`` computes ("none" is the absence of one).
RECOVERY_KINDS = ("mean", "layer_mean", "renorm")
RECOVERIES = RECOVERY_KINDS + ("none",)
CONFIG_SCHEMA_VERSION = 1
_NM_RE = re.compile(r"^\s*(\d+)\s*:\s*(\d+)\s*$")
NM_ALLOWED = "a string 'N:M' with integers 1 <= N < M, e.g. '2:4' (or None for no pattern)"


def nm_pattern(value: Any) -> tuple[int, int] | None:
    """``(N, M)`` of an N:M pattern given as ``"N:M"`` or ``(N, M)``; ``None`` for ``None``.

    The one parser of the pattern syntax (``PruneConfig.pattern``, ``oneshot.nm.parse_pattern``). Raises
    ``ValueError`` starting ``pattern=<value> is invalid`` for anything else.
    """
    if value is None:
        return None
    if isinstance(value, str) and (match := _NM_RE.match(value)) is not None:
        n, m = int(match.group(1)), int(match.group(2))
    elif (
        isinstance(value, (tuple, list))
        and len(value) == 2
        and all(isinstance(v, int) and not isinstance(v, bool) for v in value)
    ):
        n, m = int(value[0]), int(value[1])
    else:
        raise ValueError(f"pattern={value!r} is invalid; expected {NM_ALLOWED}")
    if not 1 <= n < m:
        raise ValueError(f"pattern={value!r} is invalid: need 1 <= N < M; expected {NM_ALLOWED}")
    return n, m


def default_scope(method: str, pattern: Any = None) -> str:
    """The scope ``PruneConfig`` takes when none is given: per layer with an N:M ``pattern`` (a method that uses
    one), else the method's own (``PruneMethod.default_scope``)."""
    method_cls = get_method(method)
    if pattern is not None and "pattern" not in method_cls.unused_fields:
        return "layer"
    return method_cls.default_scope


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
            weights together with one threshold, so layers end with different sparsities; ``"lamp"`` is global on
            each layer's LAMP scores (``masking.lamp_scores``: scale-free within a layer, and no layer is ever
            emptied). Methods list the scopes they support (``PruneMethod.scopes``). ``None``: the method's own
            default (``PruneMethod.default_scope``: ``"lamp"`` for POF and magnitude, ``"layer"`` for the others;
            ``"layer"`` with a ``pattern``).
        target_modules: which modules to prune: a regex (full match on the module name) or a list of
            exact names / name suffixes, as in PEFT. ``None``: every Conv2d and Linear except the stem
            conv and the classifier (from the model's ``pretrained_cfg``).
        exclude_modules: same syntax; removed from the targets.
        penalty_weight: multiplier of the method's training penalty (``PrunableModel.penalty()``); ``None``: the
            method's own default (``default_penalty_weight``: 300 for POF, whose energy is a mean of fractions,
            1 for SLR).
        pattern: ``"N:M"`` (e.g. ``"2:4"``) for semi-structured sparsity: exactly N weights kept in every group
            of M consecutive input channels (``oneshot.nm``); the sparsity is then ``1 - N/M`` (leave ``sparsity``
            unset or give that value) and the scope ``"layer"``. Every unstructured method builds its masks (and
            candidate sets / projections) in that pattern from its own scores; layers whose input-channel count is
            not a multiple of M stay dense (a warning names them). ``None``: unstructured.
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
    scope: str | None = None
    target_modules: str | list[str] | None = None
    exclude_modules: str | list[str] | None = None
    penalty_weight: float | None = None
    recovery: str | None = "mean"
    pattern: str | None = None
    method_options: Any = field(default=None, repr=True)

    def __init__(
        self,
        method: str = "pof",
        sparsity: float | None = None,
        scope: str | None = None,
        target_modules: str | list[str] | None = None,
        exclude_modules: str | list[str] | None = None,
        penalty_weight: float | None = None,
        recovery: str = "mean",
        pattern: str | None = None,
        **method_options: Any,
    ) -> None:
        if not isinstance(method, str) or method not in list_methods():
            raise ValueError(f"PruneConfig.method must be one of {list_methods()}; got {method!r}")
        try:
            nm = nm_pattern(pattern)
        except ValueError as e:
            raise ValueError(f"PruneConfig.{e}") from None
        if scope is None:
            scope = default_scope(method, nm)
        if nm is not None and "pattern" not in get_method(method).unused_fields:
            nm_sparsity = 1.0 - nm[0] / nm[1]
            if sparsity is None:
                sparsity = nm_sparsity
            elif not isinstance(sparsity, bool) and isinstance(sparsity, (int, float)):
                if abs(sparsity - nm_sparsity) > 1e-6:
                    raise ValueError(
                        f"PruneConfig.sparsity must be 1 - N/M = {nm_sparsity:g} with pattern='{nm[0]}:{nm[1]}' (or "
                        f"be left unset); got {sparsity!r}"
                    )
                sparsity = nm_sparsity
            if scope != "layer":
                raise ValueError(
                    f"PruneConfig.scope must be 'layer' with a pattern (N:M is per group of M inputs); got {scope!r}"
                )
        sparsity = 0.5 if sparsity is None else sparsity
        if isinstance(sparsity, bool) or not isinstance(sparsity, (int, float)) or not 0.0 <= sparsity < 1.0:
            raise ValueError(f"PruneConfig.sparsity must be a number in [0, 1); got {sparsity!r}")
        if scope not in SCOPES:
            raise ValueError(f"PruneConfig.scope must be one of {list(SCOPES)}; got {scope!r}")
        if scope not in get_method(method).scopes:
            raise ValueError(
                f"PruneConfig.scope {scope!r} is not supported by method {method!r}: it ranks weights with its own "
                f"scores; use one of {list(get_method(method).scopes)}"
            )
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
        self.pattern = None if nm is None else f"{nm[0]}:{nm[1]}"
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
