"""SparseGPT: one-shot pruning with weight updates, no training (Frantar & Alistarh 2023, arXiv 2301.00774).

``calibrate(batches)`` takes ``calibration_batches`` batches and runs SparseGPT's sequential mode on the model's
graph (``oneshot.capture.capture_sequential``): the targeted layers in forward order, one at a time; for each, the
layer input's Hessian ``2 X X^T / rows`` over the calibration images (Conv2d: on the unfolded input, per conv
group, with the layer's own padding, stride and dilation) is taken on the model already pruned before it, then the
OBS solve (``oneshot.sparsegpt.sparsegpt_prune``) chooses the mask row by row and updates the kept weights of the
layer to make up for the pruned ones, in place, before the next layer is measured. Memory: one layer's Hessian at
a time. With ``one_pass=True`` (default) all of it happens inside one forward over the calibration batches joined
(each layer is pruned in its forward pre-hook, before it runs); ``one_pass=False`` replays the batches one at a
time up to each layer instead (less activation memory, one pass per layer).
``prune()`` then applies the masks through the model's usual machinery; the "unmasked" weight is the updated one,
whose pruned entries are already exactly zero, so mean / layer-mean recovery find nothing to add (the OBS update is
this method's recovery) while BatchNorm re-estimation, save / load and ``merge_and_unload`` work as for every
unstructured method. Note that ``calibrate`` changes the model's weights: it is the pruning step.

- ``scope="layer"``: every output row of every layer at ``sparsity`` (the solve's own per-row selection).
- ``scope="global"``: one threshold over the OBS saliencies ``w^2 / [H^-1]_jj`` of the dense model (one more
  sequential pass, keeping one weight-sized score tensor per layer) gives each layer its sparsity; each layer is
  then solved per row at that sparsity in the sequential pass.
- ``pattern="N:M"``: the solve picks N of every M input channels as it goes (layers whose input-channel count is
  not a multiple of M stay dense, with a warning).

Layers the solve cannot serve are pruned per row by ``|W|`` at their sparsity, with a warning: layers that
transform their weight inside forward (StdConv2d / ScaledStdConv2d: the stored weight is not the one that runs, so
its Hessian update would be wrong) and layers that never run on the calibration batches.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn

from ..masking import global_keep_masks
from ..oneshot.capture import InputHessian, capture_sequential
from ..oneshot.sparsegpt import obs_scores, sparsegpt_prune
from ..oneshot.wanda import row_keep_mask
from ..registry import register_method
from ..targets import weight_transformed_in_forward
from .base import PruneMethod, is_int, is_number
from .wanda import calibration_forward, check_calibration_batches, take_batches


@dataclass
class SparseGptOptions:
    """Fields of ``PruneConfig(method="sparsegpt", ...)``; solve defaults are the paper's."""

    # Batches of calibration images read by calibrate() (the recipe's batch size).
    calibration_batches: int = 8
    # Columns per lazy-update block of the solve (the mask is chosen block by block).
    blocksize: int = 128
    # Damping of the Hessian diagonal, relative to its mean.
    percdamp: float = 0.01
    # Sequential mode in one forward over all calibration batches joined (activations of all of them in memory at
    # once); False: one pass per layer, one batch in memory at a time (slower: the model's prefix runs per layer).
    one_pass: bool = True

    def __post_init__(self) -> None:
        check_calibration_batches(self.calibration_batches)
        if not is_int(self.blocksize) or self.blocksize < 1:
            raise ValueError(f"PruneConfig.blocksize must be an integer >= 1; got {self.blocksize!r}")
        if not is_number(self.percdamp) or self.percdamp < 0:
            raise ValueError(f"PruneConfig.percdamp must be a number >= 0; got {self.percdamp!r}")
        if not isinstance(self.one_pass, bool):
            raise ValueError(f"PruneConfig.one_pass must be True or False; got {self.one_pass!r}")


def _warn(what: str, names: list[str]) -> None:
    if names:
        listed = ", ".join(names[:8]) + (" ..." if len(names) > 8 else "")
        warnings.warn(f"sparsegpt: {len(names)} layer(s) {what}; pruned per row by |W|: {listed}", stacklevel=3)


@register_method("sparsegpt")
class SparseGptMethod(PruneMethod):
    options_cls = SparseGptOptions
    default_penalty_weight = 0.0
    needs_calibration = True

    def __init__(self, config: Any, model: nn.Module) -> None:
        super().__init__(config, model)
        # Keep-masks chosen by the solve, per layer; layers absent here are pruned by |W| (module docstring).
        self.solved_masks: dict[str, torch.Tensor] = {}
        # Per-layer sparsity (global scope: from the OBS threshold; layer scope: config.sparsity).
        self.layer_sparsity: dict[str, float] = {}
        # Sum over rows of each layer's OBS error estimate (logged by calibrate).
        self.solve_loss: dict[str, float] = {}
        self.calibrated = False

    @torch.no_grad()
    def calibrate(self, batches: Iterable[Any], **kwargs: Any) -> dict[str, Any]:
        if self.calibrated:
            raise RuntimeError("sparsegpt: calibrate() already pruned this model (it updates the weights in place)")
        taken = take_batches(batches, self.config.calibration_batches)
        options, pattern = self.config.method_options, self.config.pattern
        transformed = [n for n, m in self.layers.items() if weight_transformed_in_forward(m)]
        _warn("transform their weight in forward (the solve would update the wrong weight)", transformed)
        solvable = {n: m for n, m in self.layers.items() if n not in transformed}
        if pattern is not None:
            m_size = int(pattern.split(":")[1])
            for name in [n for n, m in solvable.items() if m.weight.shape[1] % m_size]:
                self.pattern_keep_mask(name, self.layers[name].weight)  # warns, and records it as skipped
                del solvable[name]
        self.layer_sparsity = {n: self.config.sparsity for n in self.layers}
        if self.config.scope == "global" and solvable:
            self.layer_sparsity.update(self._global_sparsities(solvable, taken))

        def on_layer(name: str, module: nn.Module, stats: InputHessian) -> None:
            weight = module.weight
            sparsity = self.layer_sparsity[name]
            if sparsity >= 1.0:  # a global threshold may empty a layer
                keep = torch.zeros_like(weight, dtype=torch.bool)
                weight.zero_()
            else:
                result = sparsegpt_prune(
                    weight.detach(),
                    stats.hessian(),
                    sparsity,
                    pattern=pattern,
                    blocksize=options.blocksize,
                    percdamp=options.percdamp,
                )
                weight.copy_(result.weight)
                keep = result.keep
                self.solve_loss[name] = result.loss
            self.solved_masks[name] = keep

        run = capture_sequential(
            self.model,
            solvable,
            taken,
            on_layer,
            stats_factory=lambda n, m: InputHessian(m),
            forward=calibration_forward,
            one_pass=self.config.one_pass,
        )
        _warn("never ran on the calibration batches", run.unreached)
        self.calibrated = True
        return {
            "calibration_batches": len(taken),
            "solved_layers": len(self.solved_masks),
            "passes": run.passes,
            "obs_loss": sum(self.solve_loss.values()),
        }

    def _global_sparsities(self, layers: dict[str, nn.Module], batches: list[Any]) -> dict[str, float]:
        """Per-layer sparsities from one threshold over the dense model's OBS saliencies (one Hessian at a time)."""
        saliency: dict[str, torch.Tensor] = {}

        def on_layer(name: str, module: nn.Module, stats: InputHessian) -> None:
            saliency[name] = obs_scores(module.weight.detach(), stats.hessian(), self.config.percdamp).float().cpu()

        capture_sequential(
            self.model,
            layers,
            batches,
            on_layer,
            stats_factory=lambda n, m: InputHessian(m),
            forward=calibration_forward,
            one_pass=self.config.one_pass,
        )
        names = list(saliency)
        keeps = global_keep_masks([lambda n=n: saliency[n] for n in names], self.config.sparsity)
        return {n: 1.0 - float(keep.count_nonzero()) / keep.numel() for n, keep in zip(names, keeps, strict=True)}

    def candidate_energy(self) -> dict[str, float]:
        return super().candidate_energy() if self.calibrated else {}

    def keep_masks(self, sparsity: float | None = None) -> dict[str, torch.Tensor]:
        """The solve's masks; ``|W|`` per row (or N:M) for the layers it could not serve."""
        if not self.calibrated:
            raise RuntimeError("sparsegpt prunes during calibration: call pm.calibrate(batches) before prune()")
        if sparsity is not None and abs(sparsity - self.config.sparsity) > 1e-12:
            raise ValueError(f"sparsegpt solved its masks at sparsity {self.config.sparsity}; got sparsity={sparsity}")
        masks = {}
        for name in self.layers:
            if name in self.solved_masks:
                masks[name] = self.solved_masks[name]
            elif self.config.pattern is not None:
                masks[name] = self.pattern_keep_mask(name, self.scores(name))
            else:
                masks[name] = row_keep_mask(self.scores(name), min(self.layer_sparsity[name], 1.0 - 1e-9))
        return masks
