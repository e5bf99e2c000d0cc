"""POF: hyperspherical layers and a polarizing penalty (after "Pruning On-the-Fly", arXiv 2212.12651).

Our formulation (the paper is known to us by its abstract only; every choice is a switch):

- Each targeted layer's weight is re-parametrised per output unit as ``w = g * v / ||v||``
  (``torch.nn.utils.parametrize``; the module keeps its class and forward). ``g`` starts at ``||w||``,
  so conversion does not change the outputs, and ``u = v / ||v||`` lives on the unit sphere.
  ``hyperspherical=False`` keeps the plain weights (``v = w``): the penalty below has the same value (a share of
  each unit's energy does not depend on its scale) but acts on ``w`` itself, magnitudes included.
- The candidates are the entries pruning would remove now: per layer the ``sparsity`` fraction with the
  smallest ``|u|`` (``criterion="direction"``) or ``|w|`` (``criterion="weight"``); with
  ``scope="global"`` one threshold on the effective weights ``|w|`` (directions of layers with different
  fan-in are not comparable); with ``scope="lamp"`` (the default) one threshold on each layer's LAMP scores of
  ``|w|`` (``masking.lamp_scores``: no layer emptied, whatever the layers' scales; a large layer's estimated from a
  sample of ``lamp_sample`` entries).
- The penalty is the energy of the candidates, ``sum(u**2 over candidates)`` averaged over output units,
  averaged over layers, times ``penalty_weight``. Each unit's ``u`` has norm 1, so draining the candidates
  pushes the kept entries away from zero: the weights polarise. The candidates are re-selected every
  ``threshold_refresh`` training calls; the weight ramps up linearly over ``penalty_warmup`` calls;
  ``penalty_every=k`` computes it on one training call in k, at k times the weight.
- ``candidate_decay`` shrinks the candidates after each optimizer step by a share of their value, outside the
  gradient (as AdamW decouples weight decay): the pull an adaptive optimizer cannot normalise away.
"""

from __future__ import annotations

import contextlib
import itertools
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn as nn
from torch.nn.utils import parametrize

from ..masking import sorted_lamp_scores
from ..registry import register_method
from .base import PruneMethod, is_int, is_number
from .pof_penalty import StackedPenalty
from .schedules import cubic_sparsity

_EPS = 1e-12
# scope "lamp": (LAMP score, |w|) pairs kept per layer to turn the candidate thresholds into cutoffs on |w|.
LAMP_TABLE_POINTS = 4096


def _unit_shape(v: torch.Tensor) -> tuple[int, ...]:
    return (v.shape[0],) + (1,) * (v.dim() - 1)


def _unit_norm(v: torch.Tensor) -> torch.Tensor:
    return v.reshape(v.shape[0], -1).norm(dim=1).clamp_min(_EPS).view(_unit_shape(v))


_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


def _levels(score: torch.Tensor, thresholds: torch.Tensor) -> torch.Tensor:
    """How many of the nested candidate sets hold each entry: one at or below the i-th (ascending) threshold is
    in set i and in every larger one."""
    # contiguous: a channels-last layer's scores are not, and bucketize would warn and copy them anyway.
    return (len(thresholds) - torch.bucketize(score.contiguous(), thresholds, right=False)).to(torch.uint8)


def _copies(tensors: list[torch.Tensor]) -> list[torch.Tensor]:
    """Copies of ``tensors`` made by one multi-tensor kernel per device and dtype (the fast path wants them alike)."""
    copies = [torch.empty_like(t) for t in tensors]
    groups: dict[tuple, list[int]] = {}
    for index, tensor in enumerate(tensors):
        groups.setdefault((tensor.device, tensor.dtype), []).append(index)
    for indices in groups.values():
        torch._foreach_copy_([copies[i] for i in indices], [tensors[i] for i in indices])
    return copies


class _PrunedForwardBuffers:
    """One layer's mask and pruned weight for its pruned forwards, written in place step after step and lent to one
    autograd graph at a time. Fresh weight-sized tensors on every pruned step made glibc hand memory back to the
    system and fault it in again: with the allocator told to keep its memory (MALLOC_TRIM_THRESHOLD_ and
    MALLOC_MMAP_THRESHOLD_ set high) a pruned ResNet step cost about what a dense one does, and about 6 % more
    without; these buffers keep most of that memory without touching the allocator."""

    def __init__(self) -> None:
        self.keep: torch.Tensor | None = None
        self.weight: torch.Tensor | None = None
        # Lent to a graph that may still run its backward: the next pruned forward allocates instead of overwriting
        # what that backward will read (two forwards before one backward stay correct, just not faster).
        self.lent = False
        self._lease = 0  # which lending a give-back refers to: a stale one must not free a later graph's buffers

    def writable(self, weight: torch.Tensor) -> _PrunedForwardBuffers | None:
        """These buffers, shaped like ``weight``, when no graph holds them; None otherwise."""
        if self.lent:
            return None
        if self.weight is None or self.weight.shape != weight.shape or self.weight.dtype != weight.dtype \
                or self.weight.device != weight.device or self.weight.stride() != weight.stride():  # fmt: skip
            self.keep, self.weight = torch.empty_like(weight), torch.empty_like(weight)
        return self

    def lend(self, node: Any) -> int:
        """Lend the buffers to the graph of ``node`` (an autograd context) until its backward gives them back, or
        until the graph is freed without one (a forward that raised, a layer whose output the loss never used)."""
        self._lease += 1
        self.lent = True
        weakref.finalize(node, self.give_back, self._lease)
        return self._lease

    def give_back(self, lease: int) -> None:
        if lease == self._lease:
            self.lent = False


class _PrunedWeight(torch.autograd.Function):
    """The weight with the entries outside ``keep`` at zero, for one pruned forward; the gradient reaches every entry
    (``straight_through``: a pruned one can grow back) or the kept ones only. ``keep`` is a 0 / 1 mask in the
    weight's dtype: one vectorised multiply each way, where ``torch.where`` on a bool mask took 20x longer on CPU
    (3.7 ms against 0.18 ms per million entries, one thread). One pass each way: the same values and gradients as
    ``weight - (weight * ~keep).detach()`` (or ``weight * keep``), whose graph made a pruned ConvNeXt-atto step at
    32 px cost x1.22 a dense one instead of x1.03. With ``buffers`` (borrowed for this graph) the pruned weight is
    written into them rather than allocated; the backward gives them back."""

    @staticmethod
    def forward(ctx, weight: torch.Tensor, keep: torch.Tensor, straight_through: bool,
                buffers: _PrunedForwardBuffers | None) -> torch.Tensor:  # fmt: skip
        keep = keep.to(weight.dtype)  # no copy when it already is (the masks forward_context builds)
        if buffers is not None and buffers.lent:
            buffers = None  # a layer run twice in one forward: its first weight is still needed
        ctx.straight_through, ctx.buffers = straight_through, buffers
        if not straight_through:
            ctx.save_for_backward(keep)
        if buffers is None:
            return weight * keep  # the weight first: the product keeps its strides (a channels-last kernel stays one)
        ctx.lease = buffers.lend(ctx)
        # An alias, not the buffer itself: a new tensor for this graph that shares the buffer's version counter, so
        # a write after this graph's backward is fine and one before it (misuse of the lending) raises.
        return torch.mul(weight, keep, out=buffers.weight).detach()

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, None, None, None]:
        # The layer's own backward, which reads the pruned weight, has run before this one: the buffers are free.
        if ctx.buffers is not None:
            ctx.buffers.give_back(ctx.lease)
        if ctx.straight_through:
            return grad, None, None, None
        (keep,) = ctx.saved_tensors
        return grad * keep.to(grad.dtype), None, None, None


class _ScaleGradient(torch.autograd.Function):
    """The identity forward and the gradient times ``scale`` backward: one forward's loss weighted, its value not."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, scale: float) -> torch.Tensor:
        ctx.scale = scale
        return x.view_as(x)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad * ctx.scale, None


def _scale_gradients(output: Any, scale: float) -> Any:
    """``output`` (a tensor, or tuples / lists / dicts of them) with the gradient of each tensor scaled."""
    if isinstance(output, torch.Tensor):
        return _ScaleGradient.apply(output, scale) if output.requires_grad else output
    if isinstance(output, (tuple, list)):
        return type(output)(_scale_gradients(item, scale) for item in output)
    if isinstance(output, dict):
        return type(output)((key, _scale_gradients(item, scale)) for key, item in output.items())
    return output


def _pruned_weight(weight: torch.Tensor, keep: torch.Tensor, straight_through: bool,
                   buffers: _PrunedForwardBuffers | None = None) -> torch.Tensor:  # fmt: skip
    return _PrunedWeight.apply(weight, keep, straight_through, buffers)


class Hyperspherical(nn.Module):
    """``(g, v) -> g * v / ||v||`` per output unit; ``g`` is 1-D (one magnitude per unit). While ``forward_keep``
    is set (one of POF's pruned-forward training steps), the weight runs with the entries outside it at zero."""

    def __init__(self, straight_through: bool = True) -> None:
        super().__init__()
        self.straight_through = straight_through
        self.forward_keep: torch.Tensor | None = None
        self.forward_buffers: _PrunedForwardBuffers | None = None  # where the pruned weight goes, when lent

    def forward(self, magnitude: torch.Tensor, direction: torch.Tensor) -> torch.Tensor:
        # torch's fused weight-norm kernel (what nn.utils.parametrizations.weight_norm runs): about 7x faster
        # than the same expression in separate ops on CPU, and this runs on every training step.
        weight = torch._weight_norm(direction, magnitude.view(_unit_shape(direction)), 0)
        if self.forward_keep is not None:
            weight = _pruned_weight(weight, self.forward_keep, self.straight_through, self.forward_buffers)
        if weight.stride() != direction.stride():
            # The kernel returns contiguous strides; a channels-last model's convolutions pick their (much faster)
            # kernels by the weight's strides, as a plain layer's weight has them: give the weight the direction's.
            weight = torch.empty_like(direction, dtype=weight.dtype).copy_(weight)
        return weight

    def right_inverse(self, weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        magnitude = weight.reshape(weight.shape[0], -1).norm(dim=1)
        direction = weight.clone()
        # A unit that is entirely zero (pruned whole) has no direction; any non-zero one gives g * u = 0.
        direction[magnitude == 0] = 1.0
        return magnitude, direction


@dataclass
class PofOptions:
    """Fields of ``PruneConfig(method="pof", ...)``."""

    # Training calls of penalty() over which its weight ramps linearly from 0 to penalty_weight.
    penalty_warmup: int = 0
    # Re-select the candidate set every this many training calls (1: every step, ~1.5x the step time of 10).
    threshold_refresh: int = 10
    # Compute the penalty on one training call in this many, at this many times its weight (the other calls return
    # zero): the same pull per step on average for a k-th of its passes over every weight, which weigh on a model
    # whose activations are small next to its weights (ConvNeXt-atto at 32 px). 1: every call.
    penalty_every: int = 1
    # Per-layer ranking: "direction" (|u|, each unit on equal footing) or "weight" (|g * u|).
    criterion: str = "direction"
    # Sparsities the penalty polarises for at once: nested candidate sets, each weighted equally, so that one
    # trained model prunes well at any of them. None: just the config's sparsity.
    penalty_sparsities: list[float] | None = None
    # Candidate thresholds come from a random sample of this many entries, of each layer (scope "layer") or of
    # all layers at once (scope "global": one sample for every nested level): the penalty and the pruned
    # forwards need the candidate sets, not exact counts, and exact k-th values at every refresh were most of
    # their cost. 0: exact thresholds. prune() always uses exact ones.
    threshold_sample: int = 65536
    # Scope "lamp": a layer larger than this has its LAMP scores estimated from a random sample of this many of its
    # entries (one sort of the sample, not of the layer: ConvNeXt-atto's refresh 6x faster); 0: exact scores.
    # The candidate sets then differ from exact ones on about 1 % of their entries. prune() is always exact.
    lamp_sample: int = 4096
    # Share of training forwards that run the PRUNED model: the candidates of one penalty sparsity (drawn
    # uniformly, seeded by the step) are zeroed in the forward, the gradient reaches every weight
    # (straight-through), and BatchNorm running statistics are left as the dense forwards set them. The model
    # learns to be accurate once pruned (after CrAM, Peste et al., ICLR 2023, without its sharpness step, so a
    # step costs what a dense one does). 0: every forward is dense.
    pruned_forward: float = 0.0
    # Training calls after which every forward is dense again: the end of training (at a small learning rate under a
    # decaying schedule) refits the dense model that the pruned forwards pulled towards its pruned versions.
    # 0: pruned forwards until the end.
    pruned_forward_until: int = 0
    # The penalty sparsities the pruned forwards draw their level from (uniformly): a subset of penalty_sparsities,
    # e.g. [0.9, 0.95] to spend every pruned forward where the penalty alone leaves the pruned model far behind.
    # None: all of them.
    pruned_forward_sparsities: list[float] | None = None
    # How much a pruned forward's loss counts next to a dense one's: its gradient is scaled on the way back (the loss
    # value is unchanged). A 90-95 % pruned forward's gradient is 2-5x a dense one's on a trained model, and AdamW's
    # second-moment estimate (remembering ~1,000 steps) keeps that scale long after: below 1, the dense steps keep
    # more of their step size. 1: as a dense forward's.
    pruned_forward_loss_weight: float = 1.0
    # Training calls over which every candidate set grows from empty to its sparsity along Zhu & Gupta's cubic
    # schedule (as GMP's masks do), so that a trained model is polarised a little at a time rather than losing its
    # 98 % candidates' energy in the first epoch. 0: full sets from the first call.
    sparsity_ramp: int = 0
    # Share of each candidate's value removed after every optimizer step (on_step_end), for an entry in every nested
    # set; an entry in c of the n sets loses c / n of that share, as the penalty weighs it. Ramps in with
    # penalty_warmup. Decoupled from the gradient as AdamW's weight decay is: an adaptive optimizer normalises the
    # penalty's gradient, so it moves a candidate by at most the learning rate per step whatever penalty_weight is
    # (ConvNeXt-atto's 90 % candidates reach |w| = 0.1; 704 steps at 1e-4 move one 0.035 at most), while a decay
    # shrinks every candidate by the same factor at any learning rate. 0: off.
    candidate_decay: float = 0.0
    # Re-parametrise each layer's weight as g * v / ||v|| (the penalty drains the direction v and leaves the
    # magnitudes g free). False: plain weights, the penalty acts on them directly, and no parametrization runs at
    # all (a pruned forward swaps in the pruned weight for its one forward; a dense step costs what a plain one does).
    hyperspherical: bool = True
    # Pruned forwards pass their gradient to every weight (True: straight-through, so a pruned entry can grow back
    # into the kept set) or to the kept ones only (False: the pruned entries learn from the dense forwards alone;
    # a hyperspherical layer's still see the gradient through the norm of v).
    straight_through: bool = True
    # Pruned forwards leave the normalisation layers' scale and shift (BatchNorm, LayerNorm, GroupNorm) alone: they
    # get no gradient from a pruned forward, so they serve the dense model, and a pruned model's BatchNorm only needs
    # its statistics re-estimated. False: the pruned forwards train them too.
    hold_norms: bool = False

    def __post_init__(self) -> None:
        for name in ("hyperspherical", "straight_through", "hold_norms"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"PruneConfig.{name} must be True or False; got {getattr(self, name)!r}")
        if not is_int(self.penalty_warmup) or self.penalty_warmup < 0:
            raise ValueError(f"PruneConfig.penalty_warmup must be an integer >= 0; got {self.penalty_warmup!r}")
        if not is_int(self.penalty_every) or self.penalty_every < 1:
            raise ValueError(f"PruneConfig.penalty_every must be an integer >= 1; got {self.penalty_every!r}")
        if not is_int(self.threshold_refresh) or self.threshold_refresh < 1:
            raise ValueError(f"PruneConfig.threshold_refresh must be an integer >= 1; got {self.threshold_refresh!r}")
        if self.criterion not in ("direction", "weight"):
            raise ValueError(f"PruneConfig.criterion must be 'direction' or 'weight'; got {self.criterion!r}")
        if not is_int(self.threshold_sample) or self.threshold_sample < 0:
            raise ValueError(f"PruneConfig.threshold_sample must be an integer >= 0; got {self.threshold_sample!r}")
        if not is_int(self.lamp_sample) or self.lamp_sample < 0:
            raise ValueError(f"PruneConfig.lamp_sample must be an integer >= 0; got {self.lamp_sample!r}")
        if not is_int(self.sparsity_ramp) or self.sparsity_ramp < 0:
            raise ValueError(f"PruneConfig.sparsity_ramp must be an integer >= 0; got {self.sparsity_ramp!r}")
        if not is_int(self.pruned_forward_until) or self.pruned_forward_until < 0:
            raise ValueError(
                f"PruneConfig.pruned_forward_until must be an integer >= 0 (training calls); got "
                f"{self.pruned_forward_until!r}"
            )
        if not is_number(self.candidate_decay) or not 0.0 <= self.candidate_decay < 1.0:
            raise ValueError(
                f"PruneConfig.candidate_decay must be a number in [0, 1) (a share removed per step, e.g. 0.005); got "
                f"{self.candidate_decay!r}"
            )
        if not is_number(self.pruned_forward_loss_weight) or not self.pruned_forward_loss_weight > 0:
            raise ValueError(
                f"PruneConfig.pruned_forward_loss_weight must be a number > 0 (1: as a dense forward's loss); got "
                f"{self.pruned_forward_loss_weight!r}"
            )
        if not is_number(self.pruned_forward) or not 0.0 <= self.pruned_forward <= 1.0:
            raise ValueError(f"PruneConfig.pruned_forward must be a number in [0, 1]; got {self.pruned_forward!r}")
        levels = self.penalty_sparsities
        if levels is not None:
            if isinstance(levels, tuple):
                levels = self.penalty_sparsities = list(levels)
            if not isinstance(levels, list) or not levels or not all(is_number(v) and 0 < v < 1 for v in levels):
                raise ValueError(
                    "PruneConfig.penalty_sparsities must be None or a non-empty list of sparsities in (0, 1), "
                    f"e.g. [0.5, 0.7, 0.9]; got {self.penalty_sparsities!r}"
                )
        chosen = self.pruned_forward_sparsities
        if chosen is not None:
            if isinstance(chosen, tuple):
                chosen = self.pruned_forward_sparsities = list(chosen)
            if not isinstance(chosen, list) or not chosen or not all(is_number(v) for v in chosen):
                raise ValueError(
                    "PruneConfig.pruned_forward_sparsities must be None or a non-empty list of sparsities taken from "
                    f"penalty_sparsities, e.g. [0.9, 0.95]; got {self.pruned_forward_sparsities!r}"
                )
            missing = sorted(set(chosen) - set(levels or []))
            if missing:
                raise ValueError(
                    f"PruneConfig.pruned_forward_sparsities {missing} are not among penalty_sparsities {levels}: a "
                    "pruned forward runs one of the penalty's nested candidate sets; add them to penalty_sparsities "
                    "or pick from it"
                )


class _HostCopy:
    """A 0-d buffer's value kept on the host, for the counters read on every training step.

    Reading a GPU buffer (``int(buffer)``) waits until every kernel queued so far has run, so a step that reads
    one can no longer queue its kernels ahead of the device. The copy is trusted while it was taken from this very
    tensor at its current version: every in-place write (``fill_``, ``+=``, ``load_state_dict``'s ``copy_``) bumps
    a tensor's version, and ``.to(device)`` makes a new tensor, so after either the next read goes to the buffer.
    """

    def __init__(self) -> None:
        self._source: weakref.ref | None = None
        self._version = -1
        self._value: Any = None

    def read(self, buffer: torch.Tensor) -> Any:
        if self._source is None or self._source() is not buffer or self._version != buffer._version:
            self.wrote(buffer, buffer.item())
        return self._value

    def wrote(self, buffer: torch.Tensor, value: Any) -> None:
        """``buffer`` now holds ``value`` (just written by the caller: no need to read it back)."""
        self._source, self._version, self._value = weakref.ref(buffer), buffer._version, value


@register_method("pof")
class PofMethod(PruneMethod):
    options_cls = PofOptions
    # The penalty is a mean of per-unit energy fractions, small next to a task loss; 300 polarised the default
    # recipe's ResNet-10t (70 %: pruned 98.3 % vs 50.8 % at weight 20, same dense accuracy). Issue 5 re-tunes it.
    default_penalty_weight = 300.0
    scopes = ("layer", "global", "lamp")
    # LAMP: the one scope never far from the best on both families of benchmark v2 (ConvNeXt: +13.8 points at 90 %
    # over per layer's best baseline and +30 over global; ResNet: 0.4 / 0.9 behind global at 90 / 95 %, 8.7 ahead
    # of per layer at 90 %).
    default_scope = "lamp"

    def __init__(self, config: Any, model: nn.Module) -> None:
        super().__init__(config, model)
        # Training calls of penalty() so far: a buffer so that checkpoints resume the warm-up and refresh.
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        # Whether the candidate buffers below hold a selection yet.
        self.register_buffer("candidates_selected", torch.zeros((), dtype=torch.bool))
        self._steps_copy, self._selected_copy = _HostCopy(), _HostCopy()
        # Per layer, the mask and pruned weight the pruned forwards write in place (not state: rebuilt on demand).
        self._pruned_forward_buffers: dict[str, _PrunedForwardBuffers] = {}
        # The layers stacked by fan-in for the penalty, and their stacked candidates (a cache, not state).
        self._stacked_penalty = StackedPenalty()

    def attach(self, layers: dict[str, nn.Module]) -> None:
        super().attach(layers)
        for index, module in enumerate(layers.values()):
            # The current candidate sets are state, not a cache: between refreshes they decide the penalty, so a
            # resumed run must get them back from the checkpoint to continue exactly. Each entry holds how many of
            # the nested candidate sets (one per penalty sparsity) contain it.
            self.register_buffer(f"candidates_{index}", torch.zeros_like(module.weight, dtype=torch.uint8))
            # Plain weights (hyperspherical=False) get no parametrization at all, pruned forwards or not: a pruned
            # forward swaps their weight for the pruned one (forward_context), and the dense steps, most of them, pay
            # nothing (a parametrization call on every forward cost ConvNeXt-atto about 2 % of a 32 px step).
            if self.config.hyperspherical:
                parametrize.register_parametrization(module, "weight", Hyperspherical(self.config.straight_through))

    @property
    def _candidates(self) -> dict[str, torch.Tensor]:
        return {name: getattr(self, f"candidates_{index}") for index, name in enumerate(self.layers)}

    def candidate_counts(self) -> dict[str, torch.Tensor]:
        """Per layer, in how many of the nested candidate sets each entry lies (uint8, 0 = in none)."""
        return dict(self._candidates)

    @property
    def steps_taken(self) -> int:
        """Training calls of ``penalty()`` so far (the ``step`` buffer, read without waiting for the device)."""
        return self._steps_copy.read(self.step)

    @property
    def has_candidates(self) -> bool:
        """Whether the candidate sets hold a selection yet (the ``candidates_selected`` buffer, likewise)."""
        return self._selected_copy.read(self.candidates_selected)

    def direction(self, name: str) -> torch.Tensor:
        """The parameter the penalty drains: the direction ``v`` of a hyperspherical layer, else the weight."""
        module = self.layers[name]
        return module.parametrizations.weight.original1 if self.config.hyperspherical else module.weight

    def scores(self, name: str) -> torch.Tensor:
        if self.config.scope == "layer" and self.config.criterion == "direction":
            v = self.direction(name).detach().float()
            return (v / _unit_norm(v)).abs()
        return super().scores(name)

    def penalty_stacks(self) -> list[list[str]]:
        """The layers whose penalty is computed together (one stack per fan-in and device; see ``pof_penalty``)."""
        return [stack.names for stack in self._stacked_penalty.stacks(self._candidates)]

    @property
    def penalty_sparsities(self) -> list[float]:
        return sorted(set(self.config.penalty_sparsities or [self.config.sparsity]))

    def _warmup_ramp(self) -> float:
        warmup = self.config.penalty_warmup
        return 1.0 if warmup == 0 else min(1.0, self.steps_taken / warmup)

    def current_weight(self) -> float:
        return self.config.penalty_weight * self._warmup_ramp()

    @torch.no_grad()
    def on_step_end(self, **logs: Any) -> dict[str, Any]:
        """``candidate_decay``: after the optimizer step, each candidate keeps ``1 - decay * c / n`` of its value (``c``
        of the ``n`` nested sets hold it). In place, on the parameters the optimizer holds."""
        decay = self.config.candidate_decay * self._warmup_ramp()
        if decay == 0.0 or not self.has_candidates:
            return {}
        share_per_set = decay / len(self.penalty_sparsities)
        for name, candidates in self._candidates.items():
            parameter = self.direction(name)
            parameter.addcmul_(parameter, candidates.to(parameter.dtype), value=-share_per_set)
        return {"pof/candidate_decay": decay}

    @torch.no_grad()
    def select_candidates(self) -> None:
        """Re-select the nested candidate sets from the current weights (one per penalty sparsity)."""
        ramp = self.config.sparsity_ramp
        scale = 1.0 if ramp == 0 else cubic_sparsity(self.steps_taken, ramp, 0.0, 1.0, 0.0, 1.0)
        self.candidates_selected.fill_(True)
        self._selected_copy.wrote(self.candidates_selected, True)
        if scale <= 0.0:  # the ramp's first call: nothing is a candidate yet
            for candidates in self._candidates.values():
                candidates.zero_()
            return
        sparsities = [scale * s for s in self.penalty_sparsities]
        exact_global = self.config.scope in ("global", "lamp") and self.config.threshold_sample == 0
        if self.config.pattern is not None or exact_global:  # N:M sets or exact thresholds: keep_masks per level
            for candidates in self._candidates.values():
                candidates.zero_()
            for sparsity in sparsities:
                for name, keep in self.keep_masks(sparsity).items():
                    self._candidates[name].add_(~keep)
        elif self.config.scope == "lamp":
            self._select_on_lamp_scores(sparsities)
        elif self.config.scope == "layer":
            for name, candidates in self._candidates.items():
                score = self.scores(name)
                thresholds = self._thresholds([lambda s=score: s.reshape(-1)], [score.numel()], sparsities)
                candidates.copy_(_levels(score, thresholds))
        else:  # every level's global threshold from one sample over all layers, then one pass per layer
            names = list(self._candidates)
            scores = [lambda n=n: self.global_scores(n).reshape(-1) for n in names]
            thresholds = self._thresholds(scores, [self._candidates[n].numel() for n in names], sparsities)
            for name, candidates in self._candidates.items():
                candidates.copy_(_levels(self.global_scores(name), thresholds))

    def _select_on_lamp_scores(self, sparsities: list[float]) -> None:
        """Candidates under global thresholds on LAMP scores, with one sort of a sample per layer (batched over the
        layers whose samples have one length).

        A layer larger than ``lamp_sample`` has its LAMP scores estimated from a random sample of that many
        entries (an entry's sum of the squares at least as large is the sample's, scaled by the layer's size over
        the sample's); a smaller one gets exact scores. The global thresholds come from a draw over every layer's
        sorted scores, and each threshold becomes a cutoff on the layer's ``|w|`` through a table of
        ``LAMP_TABLE_POINTS`` (LAMP score, ``|w|``) pairs kept from that sort."""
        names = list(self._candidates)
        sample = self.config.lamp_sample
        # Each layer's |w| (a sample of it when larger than lamp_sample), grouped by length: a group is sorted, and
        # its LAMP scores computed, as the rows of one matrix (on a GPU, kernels per group rather than per layer).
        groups: dict[int, list[tuple[str, torch.Tensor, int]]] = {}
        for index, name in enumerate(names):
            score = self.scores(name).reshape(-1)
            size = score.numel()
            if 0 < sample < size:
                # Seeded by the step and the layer: every DDP rank (and a resumed run) draws the same entries.
                generator = torch.Generator(device=score.device).manual_seed(self.steps_taken * 4099 + index)
                score = score[torch.randint(size, (sample,), generator=generator, device=score.device)]
            groups.setdefault(score.numel(), []).append((name, score, size))
        sorted_lamps: dict[str, torch.Tensor] = {}
        tables = []  # per group: (LAMP score, |w|) at LAMP_TABLE_POINTS rows of each member's sorted scores
        for length, members in groups.items():
            magnitude, lamp = sorted_lamp_scores(torch.stack([score for _, score, _ in members]))
            # A sample's sums stand for the layer's: scaled by the sample's size over the layer's.
            lamp = lamp * torch.tensor([length / size for _, _, size in members], device=lamp.device).unsqueeze(1)
            rows = torch.linspace(0, length - 1, min(length, LAMP_TABLE_POINTS), device=lamp.device).long()
            tables.append(([name for name, _, _ in members], lamp[:, rows], magnitude[:, rows]))
            sorted_lamps.update((name, lamp[row]) for row, (name, _, _) in enumerate(members))

        scores = [lambda n=n: sorted_lamps[n] for n in names]
        thresholds = self._thresholds(scores, [self._candidates[n].numel() for n in names], sparsities)
        for members, table_lamp, table_magnitude in tables:
            # The table rows at or below each threshold; the cutoff is the |w| of the last one (-1: none).
            wanted = thresholds.to(table_lamp.dtype).expand(len(members), -1).contiguous()
            below = torch.searchsorted(table_lamp, wanted, right=True)
            padded = torch.cat([table_magnitude.new_full((len(members), 1), -1.0), table_magnitude], dim=1)
            for name, cutoffs in zip(members, padded.gather(1, below), strict=True):
                self._candidates[name].copy_(_levels(self.scores(name), cutoffs))

    def _thresholds(
        self, scores: list[Callable[[], torch.Tensor]], sizes: list[int], sparsities: list[float]
    ) -> torch.Tensor:
        """Thresholds of the nested candidate sets, one per sparsity, over the entries of every ``scores()`` (flat
        tensors standing for ``sizes`` entries, computed one at a time) taken together: from a random sample of
        ``threshold_sample`` of them, or all of them (0, or fewer entries than that). A sorted score tensor shorter
        than its size (a sorted sample of the layer) stands for its size by position: a draw of entry ``i`` of
        ``size`` reads position ``i * len / size``."""
        total = sum(sizes)
        if 0 < self.config.threshold_sample < total:
            device = self.device()
            # Seeded by the step: every DDP rank (and a resumed run) draws the same sample.
            generator = torch.Generator(device=device).manual_seed(self.steps_taken)
            index = torch.randint(total, (self.config.threshold_sample,), generator=generator, device=device)
            index = index.sort().values
            # Where each layer's share of the draw begins and ends, read back once (not twice per layer: on a GPU
            # every read waits for the queued kernels).
            starts = list(itertools.accumulate(sizes, initial=0))
            bounds = torch.searchsorted(index, torch.tensor(starts, device=device)).tolist()
            parts = []
            spans = zip(starts[:-1], bounds[:-1], bounds[1:], strict=True)
            for score_fn, size, (start, lo, hi) in zip(scores, sizes, spans, strict=True):  # no copy of all scores
                score = score_fn()
                local = index[lo:hi] - start
                parts.append(score[local if score.numel() == size else local * score.numel() // size])
            sample = torch.cat(parts)
        else:
            parts = []
            for score_fn, size in zip(scores, sizes, strict=True):
                score = score_fn()
                if score.numel() != size:  # every position, each standing for its share of the layer
                    score = score[torch.arange(size, device=score.device) * score.numel() // size]
                parts.append(score)
            sample = torch.cat(parts)
        ranks = [max(1, min(sample.numel(), round(p * sample.numel()))) for p in sparsities]
        return torch.stack([sample.kthvalue(k).values for k in ranks])

    def pruned_forward_level(self) -> int | None:
        """Index into ``penalty_sparsities`` of the level this training step's forward runs pruned at, or None.

        Drawn from a generator seeded by the step counter: every DDP rank and a resumed run draw alike."""
        if self.config.pruned_forward <= 0 or not self.has_candidates:
            return None
        if 0 < self.config.pruned_forward_until <= self.steps_taken:
            return None
        generator = torch.Generator().manual_seed(self.steps_taken * 1_000_003 + 17)
        if float(torch.rand((), generator=generator)) >= self.config.pruned_forward:
            return None
        levels = self.penalty_sparsities
        chosen = self.config.pruned_forward_sparsities
        allowed = [i for i, s in enumerate(levels) if chosen is None or s in chosen]
        return allowed[int(torch.randint(len(allowed), (), generator=generator))]

    def _keep_mask(
        self, name: str, candidates: torch.Tensor, pruned_from: int
    ) -> tuple[torch.Tensor, _PrunedForwardBuffers | None]:
        """The layer's 0 / 1 mask of the entries a pruned forward keeps, in its weight's dtype, and the reusable
        buffers it was written into (lent to this step's graph once the layer runs), or None where no backward will
        give them back (no gradient wanted) or an earlier graph still holds them (then the mask is a new tensor)."""
        direction = self.direction(name)
        own = None
        if torch.is_grad_enabled() and direction.requires_grad:
            own = self._pruned_forward_buffers.setdefault(name, _PrunedForwardBuffers()).writable(direction)
        # One compare written straight into a mask of the weight's dtype: a bool mask then its conversion cost 3x more
        # on a CPU, and a copy of the counts then a compare in place took two kernels (and 1.3x the time).
        keep = own.keep if own is not None else torch.empty_like(direction)
        return torch.lt(candidates, pruned_from, out=keep), own

    @contextlib.contextmanager
    def forward_context(self, training: bool):
        level = self.pruned_forward_level() if training else None
        if level is None:
            if 0 < self.config.pruned_forward_until <= self.steps_taken:
                self._pruned_forward_buffers.clear()  # no pruned forward will run again: free their memory
            yield
            return
        # Candidate counts: an entry is pruned at level i when it lies in the nested sets of level i and above.
        pruned_from = len(self.penalty_sparsities) - level
        # Running statistics describe the dense model (the pruned one gets its own by re-estimation): the pruned
        # forward updates copies, and the originals are put back afterwards. Swapped, not copied back in place:
        # batch_norm's backward reads the tensors its forward was given.
        norm_layers = [m for m in self.model.modules() if isinstance(m, _NORMS)]  # one walk of the model per step
        norms = [m for m in norm_layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        saved = [{k: b for k, b in m._buffers.items() if b is not None} for m in norms]
        layers = list(self.layers.values())
        # What _PrunedWeight multiplies each weight by, and where it writes the pruned weight.
        masks = [self._keep_mask(name, candidates, pruned_from) for name, candidates in self._candidates.items()]
        # A hyperspherical layer prunes inside its parametrization; a plain one has its weight swapped (below).
        spherical = self.config.hyperspherical
        originals = {} if spherical else {module: module.weight for module in layers}
        held = norm_layers if self.config.hold_norms else []
        held_params = [{k: p for k, p in m._parameters.items() if p is not None} for m in held]
        loss_weight = self.config.pruned_forward_loss_weight
        hook = None
        if loss_weight != 1.0:
            hook = self.model.register_forward_hook(lambda _, __, output: _scale_gradients(output, loss_weight))
        try:
            # One multi-tensor copy for every statistic, not a kernel per buffer (a GPU step is launch-bound).
            originals_flat = [buffer for buffers in saved for buffer in buffers.values()]
            copies = iter(_copies(originals_flat))
            for module, buffers in zip(norms, saved, strict=True):
                for key in buffers:
                    setattr(module, key, next(copies))
            for module, params in zip(held, held_params, strict=True):
                for key, param in params.items():
                    # Same value, zero gradient; still in the graph, so that DDP sees every parameter used.
                    # Through the dict: Module.__setattr__ only takes a Parameter under a parameter's name.
                    module._parameters[key] = param.detach() + 0 * param
            for module, (keep, own) in zip(layers, masks, strict=True):
                if spherical:
                    parametrization = module.parametrizations.weight[0]
                    parametrization.forward_keep, parametrization.forward_buffers = keep, own
                else:
                    # Through the dict, as for the held norms: the pruned weight is a tensor of the graph, not a
                    # Parameter; its gradient reaches the Parameter, which goes back in place below.
                    pruned = _pruned_weight(originals[module], keep, self.config.straight_through, own)
                    module._parameters["weight"] = pruned
            yield
        finally:
            if hook is not None:
                hook.remove()
            for module in layers:
                if spherical:
                    parametrization = module.parametrizations.weight[0]
                    parametrization.forward_keep = parametrization.forward_buffers = None
                else:
                    module._parameters["weight"] = originals[module]
            for module, params in zip(held, held_params, strict=True):
                module._parameters.update(params)
            for module, buffers in zip(norms, saved, strict=True):
                for key, buffer in buffers.items():
                    setattr(module, key, buffer)

    def penalty(self) -> torch.Tensor:
        training = torch.is_grad_enabled()
        weight = self.current_weight()
        if not self.has_candidates or (training and self.steps_taken % self.config.threshold_refresh == 0):
            self.select_candidates()
        skipped = False
        if training:
            # Calls 1, 1 + k, 1 + 2k, ... (counted from 1) carry k times the weight; the others none.
            every = self.config.penalty_every
            steps = self.steps_taken
            skipped = steps % every != 0
            weight *= every
            self.step += 1
            self._steps_copy.wrote(self.step, steps + 1)
        if weight == 0.0 or skipped:
            # Pruned forwards alone, the warm-up's first call or a call penalty_every skips: the candidates are kept
            # current, and the energy pass, its backward and the fp32 copies of every direction are skipped. Not a
            # zero tensor of the graph: nothing would reach the gradients anyway.
            return torch.zeros((), device=self.device())
        # Always float32: the energy is a sum of many small squares, which bf16 would round away.
        device_type = self.direction(next(iter(self.layers))).device.type
        with torch.autocast(device_type=device_type, enabled=False):
            directions = {name: self.direction(name) for name in self.layers}
            return (weight / len(self.penalty_sparsities)) * self._stacked_penalty(directions, self._candidates)
