"""The whole contract between a pruning method and the rest of timm_prune.

A method is an ``nn.Module`` child of ``PrunableModel`` (so its buffers and parameters, e.g. step counters or
gates, travel with ``state_dict`` and Accelerate checkpoints). It holds plain references to the wrapped model
and to the targeted layers, never registers them as children. ``PrunableModel``, the recipes and the Hub code
call a method only through the hooks below, each of which has a default here; a new method registers itself
(``@register_method("name")``), declares its options dataclass, and overrides what it needs:

=====================  ==========================================================================================
``options_cls``        its fields of ``PruneConfig`` (a dataclass validating in ``__post_init__``: ``ValueError``
                       naming ``PruneConfig.<field>``)
``unused_fields``      shared ``PruneConfig`` fields it ignores: stored as ``None``, left out of saved configs
``attach(layers)``     once, at ``convert`` time: re-parametrise the targeted layers, size state to them
``penalty()``          training penalty, a 0-dim tensor already weighted by ``penalty_weight`` (default 0)
``candidate_energy()`` per layer, the share of weight energy pruning now would remove (for logs)
``forward_context(t)`` a context manager around every forward of the model (``t``: training mode); default none
``on_step_end(**l)``   after each optimizer step (gradients still in ``.grad``); returns values worth logging
``on_epoch_end(**l)``  at each epoch boundary (``train_loss=...``); returns values worth logging
``needs_calibration``  ``True``: ``calibrate(batches)`` must run after training and before ``prune()``
``calibrate(batches)`` data-driven preparation of ``prune()`` on the trained model (AutoBot trains its gates)
``structured``         ``False``: ``prune()`` masks weights with ``keep_masks()`` (``scores()`` ranks them);
                       ``True``: ``prune_structured()`` removes channels and returns a ``report_cls``
``supports_recovery``  whether ``recover()`` applies after ``prune()`` (not once channels are gone)
``scopes``             the ``PruneConfig.scope`` values it supports; ``"lamp"`` (``global_scores``) where the method
                       ranks with the base ``keep_masks``
``default_scope``      ``PruneConfig.scope`` when the user gives none (one of ``scopes``)
``structure()``        the record that rebuilds a narrowed model (saved), ``load_structure(record)`` on load
=====================  ==========================================================================================

With ``config.pattern`` (``"N:M"``), ``keep_masks`` builds N:M masks from ``scores()`` (``pattern_keep_mask``): the
lowest ``round(sparsity * M)`` of every group of M input channels are pruned (exactly N kept at
``config.sparsity = 1 - N/M``; a method asking for a lower sparsity, like GMP's schedule, gets the same grouping
with fewer pruned per group). Layers whose input-channel dimension is not a multiple of M stay dense and are
named in a warning (``pattern_skipped``).

``calibrate`` takes an iterable of batches: input tensors, ``(inputs, labels)`` tuples / lists, or dicts with
``"pixel_values"`` (and ``"labels"``); see ``split_batch``. Methods that use labels fall back on the dense
model's own predictions for unlabeled batches.
"""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
import torch.nn as nn

from ..config import nm_pattern
from ..masking import global_keep_masks, lamp_scores, layer_keep_mask
from ..oneshot.nm import nm_keep_mask
from ..parametrizations import unmasked_weight
from ..reports import PruneReport, StructuredReport

if TYPE_CHECKING:
    from ..config import PruneConfig

_INPUT_KEYS = ("pixel_values", "image", "images", "x")
_LABEL_KEYS = ("labels", "label", "targets", "y")


def is_number(value: Any) -> bool:
    """A finite int or float, not a bool: what numeric option fields accept."""
    return not isinstance(value, bool) and isinstance(value, (int, float)) and math.isfinite(value)


def is_int(value: Any) -> bool:
    return not isinstance(value, bool) and isinstance(value, int)


def check_input_size(value: Any) -> list[int] | None:
    """``input_size`` option: ``None`` or ``[C, H, W]`` positive ints (returned as a list)."""
    if value is None:
        return None
    size = list(value)
    if len(size) != 3 or not all(is_int(v) and v > 0 for v in size):
        raise ValueError(f"PruneConfig.input_size must be None or [C, H, W] positive ints; got {size!r}")
    return size


def split_batch(batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``(inputs, labels or None)`` of a batch: a tensor, an ``(inputs, labels, ...)`` tuple / list, or a dict
    keyed ``pixel_values`` / ``image`` / ``images`` / ``x`` (labels: ``labels`` / ``label`` / ``targets`` / ``y``)."""
    if isinstance(batch, torch.Tensor):
        return batch, None
    if isinstance(batch, dict):
        x = next((batch[k] for k in _INPUT_KEYS if k in batch), None)
        if x is None:
            raise ValueError(f"batch dict has no input key (pixel_values/image/images/x); keys: {sorted(batch)}")
        return x, next((batch[k] for k in _LABEL_KEYS if k in batch), None)
    if isinstance(batch, (tuple, list)) and batch and isinstance(batch[0], torch.Tensor):
        return batch[0], (batch[1] if len(batch) > 1 else None)
    raise ValueError(f"cannot find the input tensor in a batch of type {type(batch).__name__}")


@dataclass
class NoOptions:
    """This method has no fields of its own."""


class PruneMethod(nn.Module):
    """Base of every pruning method: the contract of the module docstring, with its defaults."""

    name: ClassVar[str] = ""
    options_cls: ClassVar[type] = NoOptions
    # PruneConfig.penalty_weight when the user gives none.
    default_penalty_weight: ClassVar[float] = 1.0
    # Shared PruneConfig fields this method ignores (see PruneConfig): they are not saved.
    unused_fields: ClassVar[tuple[str, ...]] = ()
    structured: ClassVar[bool] = False
    # What prune() returns (and from_pretrained rebuilds from the saved dict).
    report_cls: ClassVar[type[PruneReport] | type[StructuredReport]] = PruneReport
    supports_recovery: ClassVar[bool] = True
    needs_calibration: ClassVar[bool] = False
    # PruneConfig.scope values: "lamp" only where the masks come from keep_masks() / global_scores() below.
    scopes: ClassVar[tuple[str, ...]] = ("layer", "global")
    # PruneConfig.scope when the user gives none.
    default_scope: ClassVar[str] = "layer"

    def __init__(self, config: PruneConfig, model: nn.Module) -> None:
        super().__init__()
        self.config = config
        # Plain references on purpose: the model and its layers belong to PrunableModel, not to the method
        # (as children they would be registered, and saved, twice).
        self.__dict__["_model"] = model
        self.layers: dict[str, nn.Module] = {}
        # N:M: layers left dense because their input-channel dimension is not a multiple of M (warned once).
        self.pattern_skipped: list[str] = []

    @property
    def model(self) -> nn.Module:
        """The wrapped timm model (``PrunableModel.model``)."""
        return self.__dict__["_model"]

    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    # ------------------------------------------------------------------ set-up
    def attach(self, layers: dict[str, nn.Module]) -> None:
        """Called once by ``convert`` with the targeted layers (qualified name -> module)."""
        self.layers.update(layers)

    # ------------------------------------------------------------------ training
    def penalty(self) -> torch.Tensor:
        """Training penalty (0-dim, differentiable), multiplied by ``penalty_weight``. Default: none."""
        return torch.zeros((), device=self.device())

    def candidate_energy(self) -> dict[str, float]:
        """Per layer, the fraction of the weight's energy (sum of squares) that pruning now would remove.

        Structured methods have no weight-level candidate set and report nothing."""
        if self.structured:
            return {}
        out = {}
        with torch.no_grad():
            for name, keep in self.keep_masks().items():
                w2 = self.weight(name).detach().float().square()
                out[name] = float((w2 * ~keep).sum() / w2.sum().clamp_min(1e-30))
        return out

    def forward_context(self, training: bool) -> contextlib.AbstractContextManager:
        """Entered around every forward of ``PrunableModel`` (e.g. POF's pruned-forward training steps). Default:
        nothing. Whatever it changes must be undone on exit, so that no state outlives the forward."""
        return contextlib.nullcontext()

    def on_step_end(self, **logs: Any) -> dict[str, Any]:
        """After each optimizer step, before ``zero_grad`` (no-op by default); returns values worth logging."""
        return {}

    def on_epoch_end(self, **logs: Any) -> dict[str, Any]:
        """Epoch-boundary update (no-op by default); returns values worth logging."""
        return {}

    def calibrate(self, batches: Iterable[Any], **kwargs: Any) -> dict[str, Any]:
        """Prepare ``prune()`` on data, after training (``needs_calibration`` methods must be called here).

        ``batches``: see ``split_batch``. Returns what is worth logging. Default: nothing to do.
        """
        return {}

    @property
    def calibration_batch_size(self) -> int | None:
        """Batch size ``calibrate`` wants from recipes (``None``: the training batch size)."""
        return None

    # ------------------------------------------------------------------ unstructured pruning
    def weight(self, name: str) -> torch.Tensor:
        """The layer's weight before masking, as the method parametrises it."""
        return unmasked_weight(self.layers[name])

    def scores(self, name: str) -> torch.Tensor:
        """Non-negative ranking scores, shaped like the weight; lowest are pruned first. Default: |w|."""
        return self.weight(name).detach().abs()

    def global_scores(self, name: str) -> torch.Tensor:
        """Layer ``name``'s scores as one threshold over all layers compares them: ``scores()``, or their LAMP
        scores (``masking.lamp_scores``) with ``scope="lamp"``."""
        scores = self.scores(name)
        return lamp_scores(scores) if self.config.scope == "lamp" else scores

    def keep_masks(self, sparsity: float | None = None) -> dict[str, torch.Tensor]:
        """Keep-masks at ``sparsity`` (default ``config.sparsity``) and ``config.scope`` for the current weights."""
        sparsity = self.config.sparsity if sparsity is None else sparsity
        names = list(self.layers)
        if self.config.pattern is not None:
            return {n: self.pattern_keep_mask(n, self.scores(n), sparsity) for n in names}
        if self.config.scope in ("global", "lamp"):
            masks = global_keep_masks([lambda n=n: self.global_scores(n) for n in names], sparsity)
            return dict(zip(names, masks, strict=True))
        return {n: layer_keep_mask(self.scores(n), sparsity) for n in names}

    def pattern_keep_mask(self, name: str, scores: torch.Tensor, sparsity: float | None = None) -> torch.Tensor:
        """Keep-mask of layer ``name`` in ``config.pattern``'s N:M grouping from ``scores`` (shaped like its weight):
        the lowest ``round(sparsity * M)`` of every group of M input channels pruned (``M - N`` at
        ``config.sparsity``). A layer whose dim 1 is not a multiple of M stays dense (all True) and is warned about.
        """
        nm = nm_pattern(self.config.pattern)
        if nm is None:
            raise ValueError(f"method {self.name!r}: pattern_keep_mask needs PruneConfig.pattern; it is None")
        m = nm[1]
        sparsity = self.config.sparsity if sparsity is None else sparsity
        pruned_per_group = min(m, max(0, int(round(sparsity * m))))
        if scores.dim() < 2 or scores.shape[1] % m:
            if name not in self.pattern_skipped:
                self.pattern_skipped.append(name)
                warnings.warn(
                    f"pattern {self.config.pattern}: layer {name!r} (weight {tuple(scores.shape)}) has an "
                    f"input-channel dimension that is not a multiple of {m}; it stays dense",
                    stacklevel=3,
                )
            return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        if pruned_per_group == 0:
            return torch.ones(scores.shape, dtype=torch.bool, device=scores.device)
        if pruned_per_group == m:
            return torch.zeros(scores.shape, dtype=torch.bool, device=scores.device)
        return nm_keep_mask(scores, (m - pruned_per_group, m))

    # ------------------------------------------------------------------ structured pruning
    def prune_structured(self) -> StructuredReport:
        """Structured methods: remove channels and return a report (called by ``PrunableModel.prune``)."""
        raise NotImplementedError(f"method {self.name!r} is unstructured; it prunes through keep_masks()")

    def structure(self) -> dict[str, Any] | None:
        """The record that rebuilds the narrowed model (``structured.record``); ``None``: nothing was removed."""
        return None

    def load_structure(self, record: dict[str, Any]) -> None:
        """On load, after the model was rebuilt narrowed by ``record``: take the pruned state back."""
        raise ValueError(f"method {self.name!r} is unstructured; a saved structure record does not apply to it")
