"""``PrunableModel``: a timm model wrapped for pruning; ``convert`` builds it, ``from_pretrained`` loads one.

The wrapper is the only place where a method, the masks / recovery of unstructured pruning and the Hub files
meet: methods are reached through their contract (``methods/base.py``), the Hub through plain data
(``hub.SavedState``).
"""

from __future__ import annotations

import contextlib
import copy
import logging
import os
import warnings
from collections.abc import Iterable
from itertools import islice
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from . import hub
from .bias_correction import correct_biases, has_bias, output_means, top1_agreement, top1_predictions
from .config import RECOVERIES, PruneConfig
from .hub import FileFormatError, SavedState
from .hub.files import PRUNING_CONFIG_NAME
from .masking import all_recovery_statistics, count_zeros
from .methods.base import split_batch
from .parametrizations import (
    MaskedWeight,
    fold_weight,
    masked_weight,
    recovery_hook,
    unmasked_weight,
    unparametrize_copy,
)
from .registry import get_method
from .reports import LayerReport, PruneReport, Report
from .targets import find_targets, weight_transformed_in_forward

logger = logging.getLogger(__name__)

# prune() warns (for methods that train with a penalty) when it removes more than this share of the
# targeted weights' energy (sum of squares).
ENERGY_WARNING_SHARE = 0.05


class PrunableModel(nn.Module):
    """A timm model whose targeted layers are re-parametrised by a pruning method.

    Its forward is the wrapped model's, so ``.train()``, ``.eval()``, ``.parameters()``, optimizers and
    ``accelerator.prepare`` work unchanged; attributes it does not have are looked up on ``self.model``
    (``pm.pretrained_cfg``, ``pm.forward_features``, ...). Build it with ``timm_prune.convert``.
    """

    def __init__(self, model: nn.Module, config: PruneConfig, targets: dict[str, nn.Module]) -> None:
        super().__init__()
        self.model = model
        self.config = config
        self.pruner = get_method(config.method)(config, model)
        self.pruner.attach(targets)
        # Method state (SLR's copies of the weights, POF's step counter) is identical on every rank by
        # construction; DDP must not re-broadcast it from rank 0 on every forward.
        self._ddp_params_and_buffers_to_ignore = [f"pruner.{name}" for name, _ in self.pruner.named_buffers()]
        self.last_report: Report | None = None
        self.recovery: str = "none"
        self._recovery_stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = {}
        self._hook_handles: dict[str, Any] = {}
        # Filled by training code (e.g. {"accuracy_dense": ..., "accuracy_pruned": ...}); saved with the model.
        self.metrics: dict[str, Any] = {}
        # Hub id of the model this one was pruned from (model-card metadata); from_pretrained restores it.
        self.base_model: str | None = None

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        with self.pruner.forward_context(self.training):
            return self.model(*args, **kwargs)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            if name == "model":
                raise
            return getattr(self.model, name)

    # ------------------------------------------------------------------ introspection
    @property
    def targets(self) -> dict[str, nn.Module]:
        """Targeted layers by qualified name (relative to ``self.model``)."""
        return self.pruner.layers

    @property
    def is_pruned(self) -> bool:
        return self.last_report is not None

    @property
    def masks(self) -> dict[str, torch.Tensor]:
        """Keep-masks (True = kept) of the pruned layers."""
        return {n: m.keep for n, m in ((n, masked_weight(mod)) for n, mod in self.targets.items()) if m is not None}

    def penalty(self) -> torch.Tensor:
        """The method's training penalty (0-dim, differentiable), already multiplied by ``penalty_weight``."""
        return self.pruner.penalty()

    def candidate_energy(self) -> dict[str, float]:
        """Per layer, the fraction of its weight energy that ``prune()`` would remove now."""
        return self.pruner.candidate_energy()

    def on_epoch_end(self, **logs: Any) -> dict[str, Any]:
        """Called by training loops at each epoch boundary (e.g. ``train_loss=...``); methods that update
        state once an epoch (SLR's multipliers) do it here. Returns what the method wants logged."""
        return self.pruner.on_epoch_end(**logs)

    def on_step_end(self, **logs: Any) -> dict[str, Any]:
        """Called by training loops after each optimizer step (gradients still in ``.grad``, i.e. before
        ``zero_grad``), on every process; e.g. ``step=..., total_steps=...``. Methods with a per-step schedule
        (PSAP's pruning steps) act here. Returns what the method wants logged (usually nothing)."""
        return self.pruner.on_step_end(**logs)

    def calibrate(self, batches: Iterable[Any], **kwargs: Any) -> dict[str, Any]:
        """Data-driven preparation of ``prune()`` after training, for methods that need it
        (``pm.pruner.needs_calibration``; AutoBot trains its gates here). ``batches``: input tensors,
        ``(inputs, labels)`` pairs or dicts with ``"pixel_values"``. Returns what the method wants logged."""
        return self.pruner.calibrate(batches, **kwargs)

    # ------------------------------------------------------------------ prune / recover
    @torch.no_grad()
    def prune(
        self,
        bias_correction_batches: Iterable[Any] | None = None,
        num_batches: int = 10,
        guard_bias_correction: bool = True,
    ) -> Report:
        """Zero the weights the method ranks lowest at ``config.sparsity`` / ``config.scope``; keep the masks.
        Structured methods remove channels instead and return a ``StructuredReport``.

        ``bias_correction_batches`` (input tensors, ``(inputs, labels)`` pairs or dicts with ``"pixel_values"``;
        the first ``num_batches`` are used): after pruning, every targeted layer with a bias gets back, per output
        unit, the mean output it had before (``timm_prune.bias_correction``), measured on these batches. The
        data-using recovery for networks without BatchNorm (ConvNeXt, ViT); it changes the biases themselves, so
        it is saved with the weights and excludes the data-free ``recover()`` kinds, which would count the pruned
        weights' contribution twice.

        ``guard_bias_correction``: keep the correction only if the pruned model's top-1 predictions on these batches
        agree with the dense model's at least as often as without it; otherwise the biases are put back and a
        warning gives both agreements. Restoring the mean can swamp a layer that pruning left almost no signal
        (a global threshold that empties a whole stage); the check needs no labels. It applies when the model
        returns ``(batch, classes)`` tensors (not to a timm model made with ``num_classes=0``); ``False`` keeps the
        correction whatever it does.

        Pruning again (e.g. after more training) recomputes the masks from the current weights.
        """
        if self.pruner.structured:
            if bias_correction_batches is not None:
                raise ValueError(
                    f"prune(bias_correction_batches=...): method {self.config.method!r} removes channels; bias "
                    "correction applies to unstructured pruning only"
                )
            # Channel removal changes the architecture itself; the method owns the whole step.
            self.last_report = self.pruner.prune_structured()
            return self.last_report
        inputs = []
        if bias_correction_batches is not None:
            if num_batches < 1:
                raise ValueError(f"prune(num_batches=...) must be >= 1; got {num_batches}")
            device = next(self.parameters()).device
            inputs = [split_batch(b)[0].to(device) for b in islice(bias_correction_batches, num_batches)]
            if not inputs:
                raise ValueError("prune(bias_correction_batches=...): the batches yielded nothing")
        previously_corrected = self.last_report.bias_corrected if isinstance(self.last_report, PruneReport) else []
        self.recover("none")
        reference, order, dense_predictions = {}, [], None
        if inputs:
            with _eval_mode(self):
                # A timm model made with num_classes=0 returns pooled features: their argmax is no prediction.
                guarded = guard_bias_correction and getattr(self.model, "num_classes", None) != 0
                outputs: list[Any] | None = [] if guarded else None
                reference, order = output_means(self, self.targets, inputs, outputs=outputs)
                if outputs is not None:
                    dense_predictions = top1_predictions(outputs)
        keep_masks = self.pruner.keep_masks()
        report = PruneReport(self.config.method, self.config.scope, self.config.sparsity)
        energy_removed, energy_total = 0.0, 0.0
        for name, module in self.targets.items():
            keep = keep_masks[name]
            weight = unmasked_weight(module).detach()
            squared = weight.double().square()
            energy_total += float(squared.sum())
            energy_removed += float(squared.sum() - squared[keep].sum())
            self._recovery_stats[name] = all_recovery_statistics(weight, keep)
            mask = masked_weight(module)
            if mask is None:
                parametrize.register_parametrization(module, "weight", MaskedWeight(keep))
            else:
                mask.keep = keep.clone()
            # Refit the originals so the kept entries keep their values and the pruned ones are stored as 0.
            module.weight = weight * keep
            pruned = module.weight
            report.layers.append(
                LayerReport(
                    name=name,
                    type=_layer_type(module).__name__,
                    shape=list(pruned.shape),
                    numel=pruned.numel(),
                    sparsity=count_zeros(pruned) / pruned.numel(),
                    weight_transformed=weight_transformed_in_forward(module),
                )
            )
        corrected = []
        if inputs:
            with _eval_mode(self):
                corrected = self._correct_biases(inputs, reference, order, dense_predictions)
        # A bias corrected once stays shifted (the correction is in the weights), whatever the new masks are.
        report.bias_corrected = sorted(set(previously_corrected) | set(corrected))
        self.last_report = report
        self._warn_unpolarised(energy_removed / energy_total if energy_total > 0 else 0.0)
        return report

    def _correct_biases(
        self,
        inputs: list[torch.Tensor],
        reference: dict[str, torch.Tensor],
        order: list[str],
        dense_predictions: list[torch.Tensor] | None,
    ) -> list[str]:
        """Bias correction of the just-pruned model; with ``dense_predictions``, undone (biases put back, warning)
        when it lowers the top-1 agreement with them on ``inputs``. Returns the names of the corrected layers."""
        if dense_predictions is None:
            return correct_biases(self, self.targets, inputs, reference, order)
        biases = {name: module.bias.detach().clone() for name, module in self.targets.items() if has_bias(module)}
        before = top1_agreement(self, inputs, dense_predictions)
        corrected = correct_biases(self, self.targets, inputs, reference, order)
        after = top1_agreement(self, inputs, dense_predictions)
        if after >= before:
            return corrected
        for name, bias in biases.items():
            self.targets[name].bias.copy_(bias)
        torch.clear_autocast_cache()  # the caller's next forward must not run a cached copy of the corrected biases
        warnings.warn(
            f"prune(bias_correction_batches=...): the correction lowered the pruned model's top-1 agreement with the "
            f"dense model on the calibration batches from {100 * before:.1f}% to {100 * after:.1f}%, so the biases "
            "were put back. It happens when pruning leaves some layers almost no signal (a global threshold that "
            "empties a stage): try scope='layer', a lower sparsity, or guard_bias_correction=False to keep it.",
            UserWarning,
            stacklevel=4,  # the caller of prune() (through torch.no_grad's wrapper)
        )
        return []

    def _warn_unpolarised(self, share: float) -> None:
        # A method that trains with a penalty should have drained what it prunes; if it has not, the
        # accuracy drop is large and nothing else would say why (mobilevitv2: 79 % -> 12 %).
        if share <= ENERGY_WARNING_SHARE or not (self.config.penalty_weight or 0) > 0:
            return
        warmup = " or its warm-up (penalty_warmup)" if hasattr(self.config.method_options, "penalty_warmup") else ""
        warnings.warn(
            f"prune(): {self.config.method} removes {100 * share:.1f}% of the targeted weights' energy "
            f"(sum of squares; above {100 * ENERGY_WARNING_SHARE:g}%), so expect a large accuracy drop: the "
            "penalty has not polarised the weights yet. Train longer, or raise penalty_weight "
            f"({self.config.penalty_weight:g}){warmup}; pm.candidate_energy() shows the share per layer while "
            "training.",
            UserWarning,
            stacklevel=4,  # the caller of prune() (through torch.no_grad's wrapper)
        )

    @torch.no_grad()
    def recover(self, kind: str | None = None) -> None:
        """Data-free recovery after ``prune()``; ``kind`` defaults to ``config.recovery``.

        The zero pattern is kept: the kept weights become ``scale * w - mean`` and a forward hook adds
        ``mean * (sum of the inputs over the receptive field)``, so the layer computes exactly the dense
        layer whose pruned entries hold ``mean`` (see ``masking.recovery_statistics``). ``"none"`` undoes it.
        """
        if not self.pruner.supports_recovery:
            if kind not in (None, "none"):
                raise ValueError(
                    f"recover(kind={kind!r}): method {self.config.method!r} removes channels, which leaves nothing to "
                    "recover; only 'none' applies"
                )
            return
        kind = self.config.recovery if kind is None else kind
        if kind not in RECOVERIES:
            raise ValueError(f"recover(kind=...) must be one of {list(RECOVERIES)}; got {kind!r}")
        if kind != "none" and not self.is_pruned:
            raise RuntimeError("recover() needs a pruned model: call prune() first")
        if kind != "none" and self.last_report.bias_corrected:
            raise ValueError(
                f"recover(kind={kind!r}): this model was pruned with bias correction, whose biases already stand in "
                "for the pruned weights; a data-free recovery on top would count them twice. Prune without "
                "bias_correction_batches to compare the two."
            )
        for name, module in self.targets.items():
            mask = masked_weight(module)
            if mask is None:
                continue
            if kind == "none":
                mask.set_recovery(None, None)
                handle = self._hook_handles.pop(name, None)
                if handle is not None:
                    handle.remove()
                continue
            mean, scale = self._recovery_stats[name][kind]
            device = mask.keep.device
            mask.set_recovery(mean.to(device) if kind != "renorm" else None, scale.to(device))
            if name not in self._hook_handles and kind != "renorm":
                self._hook_handles[name] = module.register_forward_hook(recovery_hook)
            if kind == "renorm" and name in self._hook_handles:
                self._hook_handles.pop(name).remove()
        self.recovery = kind

    def recovery_tensors(self) -> dict[str, torch.Tensor]:
        """Per layer ``<name>.mean`` (and ``<name>.scale`` for renorm) of the active recovery."""
        out = {}
        for name, module in self.targets.items():
            mask = masked_weight(module)
            if mask is None:
                continue
            if mask.mean is not None:
                out[f"{name}.mean"] = mask.mean.detach().clone()
            if mask.scale is not None:
                out[f"{name}.scale"] = mask.scale.detach().clone()
        return out

    @torch.no_grad()
    def recalibrate_batchnorm(self, batches: Iterable[Any], num_batches: int = 10) -> int:
        """Re-estimate BatchNorm running statistics on a few batches; returns how many batches were used.

        ``batches`` yields input tensors, ``(inputs, labels)`` pairs, or dicts with ``"pixel_values"``.
        Only BatchNorm layers run in training mode; everything else (dropout, drop-path) stays in eval.
        """
        if num_batches < 1:
            raise ValueError(f"recalibrate_batchnorm(num_batches=...) must be >= 1; got {num_batches}")
        norms = [m for m in self.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]
        if not norms:
            model_name = type(self.model).__name__
            logger.warning("recalibrate_batchnorm: %s has no BatchNorm layers; nothing to do", model_name)
            return 0
        was_training = self.training
        saved = [(m, m.momentum) for m in norms]
        device = next(self.parameters()).device
        self.eval()
        for m in norms:
            m.reset_running_stats()
            m.momentum = None  # cumulative average over the batches seen
            m.train()
        used = 0
        try:
            for batch in batches:
                if used >= num_batches:
                    break
                self(split_batch(batch)[0].to(device))
                used += 1
        finally:
            for m, momentum in saved:
                m.momentum = momentum
            self.train(was_training)
        if used == 0:
            raise ValueError("recalibrate_batchnorm: `batches` yielded nothing")
        return used

    # ------------------------------------------------------------------ merge
    @torch.no_grad()
    def merge_and_unload(self, recovered: bool = False) -> nn.Module:
        """A new plain timm model (original class, standard layers) with the weights folded in.

        ``recovered=False``: pruned entries are exact zeros (the recovery lives in ``recovery_tensors()``).
        ``recovered=True``: the active recovery is folded in, dense (pruned entries hold their means).
        ``self`` is left untouched and usable.
        """
        if recovered and self.recovery == "none":
            raise RuntimeError("merge_and_unload(recovered=True) needs an active recovery: call recover() first")
        folded = {name: fold_weight(module, recovered) for name, module in self.targets.items()}
        merged = copy.deepcopy(self.model)
        for name, weight in folded.items():
            module = merged.get_submodule(name)
            for handle in self._hook_handles.values():
                module._forward_hooks.pop(handle.id, None)
            unparametrize_copy(module, weight)
        return merged

    # ------------------------------------------------------------------ hub (files written by timm_prune.hub)
    def saved_state(self) -> SavedState:
        """What ``save_pretrained`` writes, as plain data (merged weights, masks, recovery, report, metrics)."""
        # Structured methods narrowed the model itself: nothing to fold, but the narrowing is recorded.
        return SavedState(
            model=self.model if self.pruner.structured else self.merge_and_unload(),
            config=self.config,
            report=self.last_report.to_dict() if self.is_pruned else None,
            recovery=self.recovery,
            masks=self.masks if self.is_pruned else {},
            recovery_stats=dict(self._recovery_stats),
            metrics=dict(self.metrics),
            structure=self.pruner.structure() if self.is_pruned else None,
            base_model=self.base_model,
        )

    def save_pretrained(self, save_directory: str | os.PathLike, **kwargs: Any) -> str:
        """Write config.json, weights, pruning_config.json, recovery tensors and a model card; see
        ``timm_prune.hub.save_pretrained`` for ``save_format="dense"|"compact"`` and the other options."""
        return hub.save_pretrained(self.saved_state(), save_directory, **kwargs)

    def push_to_hub(self, repo_id: str, **kwargs: Any) -> str | None:
        """Save and upload to the Hub in one commit; returns the commit URL (``None`` off the main process).
        See ``timm_prune.hub.push_to_hub`` for ``private``, ``revision``, ``commit_message``, ``save_format``."""
        if not hub.push.is_main_process():
            return None  # before saved_state(): other ranks do not even merge
        return hub.push_to_hub(self.saved_state(), repo_id, **kwargs)


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Evaluation mode (no dropout, BatchNorm running statistics) for the duration, then the mode it had."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def convert(model: nn.Module, config: PruneConfig | None = None, **config_kwargs: Any) -> PrunableModel:
    """Wrap ``model`` (in place, as PEFT does) for pruning with ``config``; outputs do not change.

    Build optimizers after converting: the targeted weights are replaced by the method's parameters.
    """
    if isinstance(model, PrunableModel):
        raise ValueError("convert: the model is already a PrunableModel; convert the original timm model once")
    if config is None:
        config = PruneConfig(**config_kwargs)
    elif config_kwargs:
        raise ValueError("convert: pass either a PruneConfig or its fields as keyword arguments, not both")
    if not isinstance(config, PruneConfig):
        raise TypeError(f"convert: config must be a PruneConfig; got {type(config).__name__}")
    for name, module in model.named_modules():
        if parametrize.is_parametrized(module):
            raise ValueError(
                f"convert: module {name!r} is already parametrized; timm_prune needs plain layers "
                "(was this model converted before?)"
            )
    targets = find_targets(model, config.target_modules, config.exclude_modules)
    return PrunableModel(model, config, targets)


def _layer_type(module: nn.Module) -> type:
    # parametrize swaps in a generated subclass; report the class the user knows.
    return type(module).__bases__[0] if parametrize.is_parametrized(module) else type(module)


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
    source = hub.locate(model_id, revision, token=token, cache_dir=cache_dir, local_files_only=local_files_only)
    state = hub.load_state(source, recover)
    pm = convert(state.model, state.config)
    if state.report is not None:
        try:
            report = pm.pruner.report_cls.from_dict(state.report)
        except (KeyError, TypeError) as e:
            kind = "structured " if state.structure is not None else ""
            raise FileFormatError(PRUNING_CONFIG_NAME, f"malformed {kind}'report' ({e})") from None
        if state.structure is not None:
            pm.pruner.load_structure(state.structure)
            pm.last_report = report
        else:
            _restore_masks(pm, report, state)
            if state.recovery != "none":
                pm.recover(state.recovery)
    pm.metrics = dict(state.metrics)
    pm.base_model = state.base_model
    return pm.to(device).eval()


@torch.no_grad()
def _restore_masks(pm: PrunableModel, report: PruneReport, state: SavedState) -> None:
    """Put masks, recovery statistics and the report back, as ``pm.prune()`` left them at save time."""
    names = [row.name for row in report.layers]
    if set(names) != set(pm.targets) or set(names) != set(state.masks):
        extra, missing = sorted(set(names) - set(pm.targets)), sorted(set(pm.targets) - set(names))
        raise FileFormatError(
            PRUNING_CONFIG_NAME,
            f"the report's layers do not match the layers the config targets (only in the report: {extra[:5]}, "
            f"only targeted: {missing[:5]})",
        )
    for name in names:
        module = pm.targets[name]
        weight = unmasked_weight(module).detach()
        keep = state.masks[name].to(weight.device)
        mask = masked_weight(module)
        if mask is None:
            parametrize.register_parametrization(module, "weight", MaskedWeight(keep))
        else:
            mask.keep = keep.clone()
        module.weight = weight * keep  # refit the method's originals through its right_inverse
        pm._recovery_stats[name] = state.recovery_stats[name]
    pm.last_report = report
