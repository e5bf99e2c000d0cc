"""SLR: surrogate Lagrangian relaxation for unstructured, retrain-free hard pruning (arXiv 2012.10079).

Our formulation. For every targeted layer ``l`` with weight ``W_l`` and target sparsity ``p_l`` (``sparsity``,
or the matching ``layer_sparsity`` override), the constraint set is
``S_l = {Z : Z has at most numel(W_l) - round(p_l * numel(W_l)) non-zeros}`` (with ``scope="global"``: one set
over all targeted weights, ``round(sparsity * total)`` zeros in all). The method keeps, per layer, a copy ``Z_l``
in ``S_l``, multipliers ``Lambda_l`` (``U_l = Lambda_l / rho``), the last accepted point ``W_prev``/``Z_prev``
(copies, never references to the live weights), a step size ``s``, an iteration counter ``k`` and the previous
epoch's loss.

- Training minimises ``f(W) + penalty()``, where
  ``penalty() = penalty_weight * sum_l rho/2 * ||W_l - Z_l + U_l||^2`` (float32, outside autocast).
- The surrogate Lagrangian used by the acceptance checks is
  ``L(W, Z, Lambda) = f + penalty_weight * sum_l (rho/2 * ||W_l - Z_l + U_l||^2 - rho/2 * ||U_l||^2)``
  (= ``f + <Lambda, W - Z> + rho/2 ||W - Z||^2`` for ``penalty_weight=1``), with ``f`` the epoch's mean training
  loss passed to ``on_epoch_end(train_loss=...)`` (averaged over processes when torch.distributed is up).
- ``Z_0`` is the projection of the converted weights (so the penalty means something from the first step),
  ``W_prev = W_0``, ``Z_prev = Z_0``, ``Lambda = 0``, ``s = initial_step``, ``k = 1``.
- Once an epoch (``on_epoch_end``), in the order of the authors' code (``slr/admm.py``, ``z_u_update``):

  1. Multiplier check (``multiplier_step``): accept if ``k == 1`` or
     ``L(W, Z_prev, Lambda) < L(W_prev, Z_prev, Lambda)`` where the left side uses this epoch's loss and the right
     side the previous epoch's. If accepted: ``s <- alpha_k * s * n1 / n2`` with
     ``n1 = sum_l ||W_prev - Z_prev||``, ``n2 = sum_l ||W - Z_prev||`` (skipped when ``k == 1`` or a norm is 0),
     ``k <- k + 1``, ``Lambda <- Lambda + s * (W - Z_prev)``, ``W_prev <- W``, ``Z_prev <- Z``.
     Otherwise the multipliers (and ``s``, ``k``, ``W_prev``, ``Z_prev``) stay as they were.
  2. Z update and check (``z_step``): ``Z <- Proj_S(W + U)`` (keep the largest ``|W + U|`` entries), always kept.
     Accept if ``L(W, Z, Lambda) < L(W, Z_prev, Lambda)``, again this epoch's loss on the left and the previous
     one on the right (as the authors' code does). If accepted: ``s <- alpha_k * s * n1 / n2`` with
     ``n2 = sum_l ||W - Z||``, ``k <- k + 1``, ``Lambda <- Lambda + s * (W - Z)``, ``W_prev <- W``, ``Z_prev <- Z``;
     otherwise the multipliers stay.

  ``alpha_k = 1 - 1 / (M * k ** (1 - 1 / k ** r))``, so every accepted multiplier move ``s * ||W - Z||`` is
  ``alpha_k`` times the previous one. Where the previous epoch's loss is unknown (first call), both sides use the
  current loss, so it cancels.
- ``prune()`` keeps the largest ``|W_l|`` entries of each layer at its own sparsity (per layer; one threshold
  with ``scope="global"``): hard pruning, no retraining.

Differences from the authors' code, on purpose: ``W_prev`` is a copy (the code keeps a reference to the live
parameter, which makes check 1 compare only the losses); ``W_prev``/``Z_prev`` start at ``W_0``/``Z_0`` instead
of zeros and the first previous loss is "unknown" instead of 0 (the code's zeros make the first step and the first
check 2 depend on an all-zero point); the ``||U||^2`` term enters with a minus sign (it is identical on both sides
of each check, so decisions are the same; only the logged value differs).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

from ..masking import global_keep_masks, layer_keep_mask
from ..registry import register_method
from .base import PruneMethod, is_number

_TensorOf = Callable[[str], torch.Tensor]


@dataclass
class SlrOptions:
    """Fields of ``PruneConfig(method="slr", ...)``; defaults are the authors' code defaults."""

    # Penalty coefficient rho of the augmented term rho/2 * ||W - Z + U||^2 (U = Lambda / rho).
    rho: float = 0.1
    # Step-size schedule alpha_k = 1 - 1 / (M * k ** (1 - 1 / k ** r)); the paper's convergence needs M > 1, 0 < r < 1.
    M: float = 300.0
    r: float = 0.1
    # s_0: the step size of the first multiplier update.
    initial_step: float = 0.01
    # Per-layer sparsity overrides: key = exact layer name, name suffix on a "." boundary, or regex (full match).
    layer_sparsity: dict[str, float] | None = None

    def __post_init__(self) -> None:
        if not is_number(self.rho) or self.rho <= 0:
            raise ValueError(f"PruneConfig.rho must be a finite number > 0; got {self.rho!r}")
        if not is_number(self.M) or self.M <= 1:
            raise ValueError(f"PruneConfig.M must be a finite number > 1; got {self.M!r}")
        if not is_number(self.r) or not 0 < self.r < 1:
            raise ValueError(f"PruneConfig.r must be a number in (0, 1); got {self.r!r}")
        if not is_number(self.initial_step) or self.initial_step <= 0:
            raise ValueError(f"PruneConfig.initial_step must be a finite number > 0; got {self.initial_step!r}")
        if self.layer_sparsity is None:
            return
        if not isinstance(self.layer_sparsity, dict):
            raise ValueError(
                "PruneConfig.layer_sparsity must be None or a dict {layer name / suffix / regex: sparsity}; "
                f"got {self.layer_sparsity!r} ({type(self.layer_sparsity).__name__})"
            )
        for key, value in self.layer_sparsity.items():
            if not isinstance(key, str) or not key:
                raise ValueError(f"PruneConfig.layer_sparsity keys must be non-empty strings; got {key!r}")
            try:
                re.compile(key)
            except re.error as e:
                raise ValueError(f"PruneConfig.layer_sparsity key {key!r} is not a valid regex ({e})") from None
            if not is_number(value) or not 0.0 <= value < 1.0:
                raise ValueError(f"PruneConfig.layer_sparsity[{key!r}] must be a number in [0, 1); got {value!r}")
        # Floats, so that a JSON round trip (where 0 and 0.0 differ in type only) compares equal.
        self.layer_sparsity = {k: float(v) for k, v in self.layer_sparsity.items()}


def _key_matches(name: str, key: str) -> bool:
    return name == key or name.endswith("." + key) or re.fullmatch(key, name) is not None


def resolve_layer_sparsity(names: list[str], default: float, overrides: dict[str, float] | None) -> dict[str, float]:
    """Per-layer sparsity: an exact-name key wins; otherwise the one matching suffix/regex key; else ``default``.

    Raises ``ValueError`` for a key that matches no targeted layer (a typo would silently prune at the default)
    and for a layer matched by several keys with different values.
    """
    out = {name: default for name in names}
    if not overrides:
        return out
    used: set[str] = set()
    for name in names:
        if name in overrides:
            out[name] = overrides[name]
            used.add(name)
            continue
        hits = [key for key in overrides if _key_matches(name, key)]
        used.update(hits)
        values = {overrides[key] for key in hits}
        if len(values) > 1:
            raise ValueError(
                f"PruneConfig.layer_sparsity: layer {name!r} is matched by keys {hits} with different sparsities; "
                "use its exact name as a key to decide"
            )
        if hits:
            out[name] = overrides[hits[0]]
    unused = [key for key in overrides if key not in used]
    if unused:
        shown = ", ".join(names[:12]) + (f", ... ({len(names) - 12} more)" if len(names) > 12 else "")
        raise ValueError(f"PruneConfig.layer_sparsity keys {unused} match no targeted layer; targeted: {shown}")
    return out


class _LayerState(nn.Module):
    """SLR state of one layer, as persistent buffers (so state_dict and Accelerate checkpoints carry it)."""

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        w = weight.detach().to(torch.float32)
        self.register_buffer("z", torch.zeros_like(w))
        self.register_buffer("lam", torch.zeros_like(w))
        # clone(): W_prev must be a copy of the weight, never an alias of the live parameter.
        self.register_buffer("w_prev", w.clone())
        self.register_buffer("z_prev", torch.zeros_like(w))


def _sq(t: torch.Tensor) -> float:
    # Sums of squares in float64: the checks compare two large, nearly equal sums.
    return float(t.double().square().sum())


def mean_over_processes(value: float, device: torch.device) -> float:
    """``value`` averaged over torch.distributed ranks (unchanged when not distributed)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return value
    # NCCL reduces only CUDA tensors; gloo and others reduce CPU tensors.
    on = device if dist.get_backend() == "nccl" else torch.device("cpu")
    t = torch.tensor([value], dtype=torch.float64, device=on)
    dist.all_reduce(t)
    return float(t) / dist.get_world_size()


@register_method("slr")
class SlrMethod(PruneMethod):
    """See the module docstring for the formulation. The layers are not re-parametrised."""

    options_cls = SlrOptions

    def __init__(self, config: Any, model: nn.Module) -> None:
        super().__init__(config, model)
        # Keys are layer names with "." replaced by "/" (module names may not contain dots).
        self.slr = nn.ModuleDict()
        # Scalars as 0-dim buffers so checkpoints resume the schedule exactly.
        self.register_buffer("k", torch.ones((), dtype=torch.int64))
        self.register_buffer("step_size", torch.tensor(float(config.initial_step), dtype=torch.float32))
        self.register_buffer("prev_loss", torch.tensor(float("nan"), dtype=torch.float32))
        self.register_buffer("epochs", torch.zeros((), dtype=torch.int64))
        self.sparsities: dict[str, float] = {}  # per layer, overrides resolved at attach

    # ------------------------------------------------------------------ setup
    def attach(self, layers: dict[str, nn.Module]) -> None:
        if self.config.scope == "global" and self.config.layer_sparsity:
            raise ValueError(
                "PruneConfig.layer_sparsity cannot be combined with scope='global' (one global budget has no "
                "per-layer sparsity); use scope='layer' or drop layer_sparsity"
            )
        super().attach(layers)
        self.sparsities.update(resolve_layer_sparsity(list(layers), self.config.sparsity, self.config.layer_sparsity))
        for name in layers:
            self.slr[name.replace(".", "/")] = _LayerState(self.weight(name))
        with torch.no_grad():
            # Z_0 = Proj(W_0): the penalty pulls towards the constraint from the first step (the code's init).
            zs = self._project({n: self.weight(n).detach().float() for n in self.layers})
            for name, z in zs.items():
                state = self.state_of(name)
                state.z.copy_(z)
                state.z_prev.copy_(z)

    def state_of(self, name: str) -> _LayerState:
        """The layer's SLR buffers: ``z``, ``lam`` (Lambda), ``w_prev``, ``z_prev``."""
        return self.slr[name.replace(".", "/")]

    def multipliers(self, name: str) -> torch.Tensor:
        """``U = Lambda / rho`` of a layer."""
        return self.state_of(name).lam / self.config.rho

    @staticmethod
    def alpha(k: int, M: float, r: float) -> float:
        """Step-size factor ``alpha_k = 1 - 1 / (M * k ** (1 - 1 / k ** r))``."""
        return 1.0 - 1.0 / (M * k ** (1.0 - 1.0 / k**r))

    def _project(self, values: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Euclidean projection onto the sparsity constraint: keep the largest ``|value|`` entries."""
        if self.config.pattern is not None:  # N:M: the projection keeps the largest N of every group of M
            return {n: v * self.pattern_keep_mask(n, v.abs()) for n, v in values.items()}
        if self.config.scope == "global":
            names = list(values)
            keeps = global_keep_masks([lambda n=n: values[n].abs() for n in names], self.config.sparsity)
            return {n: values[n] * keep for n, keep in zip(names, keeps, strict=True)}
        return {n: v * layer_keep_mask(v.abs(), self.sparsities[n]) for n, v in values.items()}

    # ------------------------------------------------------------------ pruning
    def keep_masks(self, sparsity: float | None = None) -> dict[str, torch.Tensor]:
        """Largest ``|W|`` per layer at its own sparsity (overrides included); ``scope="global"``: one threshold.
        An explicit ``sparsity`` applies to every layer instead."""
        if self.config.scope == "global" or sparsity is not None or self.config.pattern is not None:
            return super().keep_masks(sparsity)
        return {n: layer_keep_mask(self.scores(n), self.sparsities[n]) for n in self.layers}

    # ------------------------------------------------------------------ training
    def penalty(self) -> torch.Tensor:
        rho = self.config.rho
        first = next(iter(self.layers))
        # Float32 outside autocast: a sum of many small squares, which bf16/fp16 would round away.
        with torch.autocast(device_type=self.weight(first).device.type, enabled=False):
            terms = []
            for name in self.layers:
                state = self.state_of(name)
                w = self.weight(name).float()
                terms.append((w - state.z.float() + state.lam.float() / rho).square().sum())
            return self.config.penalty_weight * (rho / 2) * torch.stack(terms).sum()

    def _augmented(self, w_of: _TensorOf, z_of: _TensorOf) -> float:
        """``penalty_weight * sum_l (rho/2 ||W_l - Z_l + U_l||^2 - rho/2 ||U_l||^2)`` for the given W and Z."""
        rho = self.config.rho
        total = 0.0
        for name in self.layers:
            u = self.state_of(name).lam.float() / rho
            total += rho / 2 * (_sq(w_of(name) - z_of(name) + u) - _sq(u))
        return self.config.penalty_weight * total

    def _gap_sum(self, w_of: _TensorOf, z_of: _TensorOf) -> float:
        """``sum_l ||W_l - Z_l||``: the norms of the authors' step-size rule."""
        return sum(math.sqrt(_sq(w_of(n) - z_of(n))) for n in self.layers)

    def _accept(self, gap_before: float, gap_after: float, z_move: _TensorOf, z_keep: _TensorOf) -> None:
        """Accepted update: rescale ``s``, ``Lambda += s * (W - z_move)``, remember ``W`` and ``z_keep`` by value."""
        k = int(self.k)
        if k > 1 and gap_before > 0 and gap_after > 0:
            alpha = self.alpha(k, self.config.M, self.config.r)
            self.step_size.fill_(alpha * float(self.step_size) * gap_before / gap_after)
        self.k += 1
        s = float(self.step_size)
        for name in self.layers:
            state = self.state_of(name)
            w = self._w(name)
            # Multiplier move first: z_move may be this layer's z_prev, which is overwritten just below.
            state.lam.add_(w - z_move(name), alpha=s)
            state.w_prev.copy_(w)
            state.z_prev.copy_(z_keep(name))

    def _w(self, name: str) -> torch.Tensor:
        return self.weight(name).detach().float()

    def _z(self, name: str) -> torch.Tensor:
        return self.state_of(name).z

    def _w_prev(self, name: str) -> torch.Tensor:
        return self.state_of(name).w_prev

    def _z_prev(self, name: str) -> torch.Tensor:
        return self.state_of(name).z_prev

    @torch.no_grad()
    def multiplier_step(self, loss: float, prev_loss: float) -> dict[str, Any]:
        """Check 1 and the multiplier update after the epoch's W steps (Z fixed at ``Z_prev``)."""
        new = loss + self._augmented(self._w, self._z_prev)
        old = prev_loss + self._augmented(self._w_prev, self._z_prev)
        accepted = int(self.k) == 1 or new < old
        if accepted:
            # Both norms before anything moves: n1 from the last accepted point, n2 from the current W.
            n1 = self._gap_sum(self._w_prev, self._z_prev)
            n2 = self._gap_sum(self._w, self._z_prev)
            # As in the code: the multipliers move along W - Z_prev, and Z_prev then becomes the current Z.
            self._accept(n1, n2, z_move=self._z_prev, z_keep=self._z)
        return {"slr/accepted_w": bool(accepted), "slr/lagrangian_w_new": new, "slr/lagrangian_w_old": old}

    @torch.no_grad()
    def z_step(self, loss: float, prev_loss: float) -> dict[str, Any]:
        """Z <- Proj(W + U), then check 2 and the multiplier update along ``W - Z``."""
        projected = self._project({n: self._w(n) + self.multipliers(n).float() for n in self.layers})
        for name, z in projected.items():
            self.state_of(name).z.copy_(z)
        new = loss + self._augmented(self._w, self._z)
        old = prev_loss + self._augmented(self._w, self._z_prev)
        accepted = int(self.k) == 1 or new < old
        if accepted:
            n1 = self._gap_sum(self._w_prev, self._z_prev)
            n2 = self._gap_sum(self._w, self._z)
            self._accept(n1, n2, z_move=self._z, z_keep=self._z)
        return {"slr/accepted_z": bool(accepted), "slr/lagrangian_z_new": new, "slr/lagrangian_z_old": old}

    def on_epoch_end(self, train_loss: float | torch.Tensor | None = None, **logs: Any) -> dict[str, Any]:
        """Once-an-epoch SLR update; call it on every process with the epoch's mean training loss (no penalty).

        Returns values worth logging (``slr/...``): the decisions of both checks, the Lagrangian values
        compared, ``k``, the step size and the remaining gap ``||W - Z||`` (absolute and relative to ``||W||``).
        """
        if train_loss is None:
            raise ValueError(
                "slr: on_epoch_end needs train_loss=<the epoch's mean training loss, without the penalty>; "
                "the multiplier updates are accepted only when the surrogate Lagrangian decreases"
            )
        loss = float(train_loss.detach()) if isinstance(train_loss, torch.Tensor) else float(train_loss)
        # Every rank must take the same decisions: W is identical under DDP, the loss is made identical here.
        # Reduce before validating, so that a NaN on one rank makes every rank raise instead of one hanging.
        loss = mean_over_processes(loss, self.k.device)
        if not math.isfinite(loss):
            raise ValueError(f"slr: on_epoch_end got a non-finite train_loss ({loss}); SLR cannot judge the update")
        prev = float(self.prev_loss)
        prev = loss if math.isnan(prev) else prev
        out: dict[str, Any] = {"slr/train_loss": loss}
        out.update(self.multiplier_step(loss, prev))
        out.update(self.z_step(loss, prev))
        self.prev_loss.fill_(loss)
        self.epochs += 1
        with torch.no_grad():
            gap2 = sum(_sq(self._w(n) - self.state_of(n).z) for n in self.layers)
            w2 = sum(_sq(self._w(n)) for n in self.layers)
        out.update(
            {
                "slr/k": int(self.k),
                "slr/step_size": float(self.step_size),
                "slr/gap": math.sqrt(gap2),
                "slr/gap_rel": math.sqrt(gap2 / max(w2, 1e-30)),
            }
        )
        return out
