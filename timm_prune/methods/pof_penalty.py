"""POF's polarizing penalty over all targeted layers, in a few kernels per fan-in rather than per layer.

The penalty is, per output unit, the candidates' share of the unit's energy ``sum(c * v^2) / sum(v^2)`` (``c``
counting how many nested candidate sets hold each entry), averaged over each layer's units, then over layers.
Layer by layer that is about fifteen small kernels per layer, forward and backward; a small model's step on a GPU
is bound by kernel launches, and the half-width ResNet-18 recipe measured x1.66 a plain step there for the
penalty alone (H200, 36 px). A unit's share only needs the unit's own row, so layers whose units have the same
fan-in (``numel / out_channels``) are stacked into one ``(units, fan_in)`` matrix and each stack is one
forward and one backward: 7 stacks for 20 layers of a ResNet-18, 2 for the 48 of a ViT. The cost is a copy of
the weights into the stacks (one pass) and, between candidate refreshes, one float32 copy of the candidates.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

_EPS = 1e-12
# On a CPU a stack holds at most this many entries (1 MB in float32). Larger temporaries leave glibc's heap: they
# are mapped and faulted in again on every step. Unbounded, ViT-tiny's 2 stacks and ResNet-18's 7 took about x1.5
# the layer-by-layer time; in 2**18 pieces x0.74-0.98 on ConvNeXt-atto, ViT-tiny and ResNet-18
# (bench/penalty_stacking_cost.py, one thread). A GPU, where the launches are the cost, stacks without a bound.
CPU_STACK_ENTRIES = 2**18


def _rows(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.reshape(tensor.shape[0], -1)


def _at_least_float32(tensor: torch.Tensor) -> torch.Tensor:
    # float32 even for bf16 weights: the energy is a sum of many small squares, which bf16 would round away.
    return tensor.to(torch.promote_types(tensor.dtype, torch.float32))


class StackedCandidateEnergy(torch.autograd.Function):
    """``sum over units of unit_weight * share``, the shares of the units of several layers stacked row-wise, with
    the gradient ``2 v (c - share) * unit_weight / sum(v^2)`` per row written out: a third of the element-wise
    passes autograd would make, on every training step."""

    @staticmethod
    def forward(ctx, unit_weights: torch.Tensor, candidates: torch.Tensor, *directions: torch.Tensor) -> torch.Tensor:
        rows = [_rows(_at_least_float32(d)) for d in directions]
        v = torch.cat(rows) if len(rows) > 1 else rows[0]
        # In v's dtype, for forward and backward: mixed-dtype operations are 10x slower on a CPU.
        counts = candidates if candidates.dtype == v.dtype else candidates.to(v.dtype)
        v2 = v.square()
        energy = v2.sum(1).clamp_min(_EPS**2)
        share = (v2 * counts).sum(1).div_(energy)
        ctx.save_for_backward(v, counts, share, energy, unit_weights)
        ctx.units = [d.shape[0] for d in directions]
        ctx.shapes = [d.shape for d in directions]
        return share.dot(unit_weights)

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        v, counts, share, energy, unit_weights = ctx.saved_tensors
        per_unit = (unit_weights * (2 * grad)).div_(energy).unsqueeze(1)
        # (c - share) * per_unit in one pass, then times v in place; one slice of rows per layer.
        full = torch.addcmul(-(share.unsqueeze(1) * per_unit), counts, per_unit).mul_(v)
        parts = full.split(ctx.units) if len(ctx.units) > 1 else (full,)
        return None, None, *(part.view(shape) for part, shape in zip(parts, ctx.shapes, strict=True))


@dataclass
class _Stack:
    names: list[str]
    # float32 (units, fan_in), the layers' candidate counts stacked row-wise: kept between refreshes, so a step
    # converts nothing (the step saved a float copy for its backward anyway: the peak memory is the same).
    candidates: torch.Tensor
    unit_weights: torch.Tensor  # float32 (units,): 1 / (the unit's layer's number of units)


class StackedPenalty:
    """The layers stacked by fan-in and device, and their stacked candidate counts, rebuilt whenever a candidate
    buffer is written (a refresh, ``load_state_dict``) or replaced (``.to(device)``): tensors' versions tell."""

    def __init__(self) -> None:
        self._key: list[tuple[torch.Tensor, int]] = []
        self._stacks: list[_Stack] = []

    def _current(self, candidates: dict[str, torch.Tensor]) -> bool:
        if len(self._key) != len(candidates):
            return False
        return all(t is c and v == c._version for (t, v), c in zip(self._key, candidates.values(), strict=True))

    def stacks(self, candidates: dict[str, torch.Tensor]) -> list[_Stack]:
        if not self._current(candidates):
            self._stacks = [self._stack(names, candidates) for names in self._groups(candidates)]
            self._key = [(c, c._version) for c in candidates.values()]
        return self._stacks

    @staticmethod
    def _groups(candidates: dict[str, torch.Tensor]) -> list[list[str]]:
        """Layer names by (device, fan-in), in model order; on a CPU cut into pieces of CPU_STACK_ENTRIES."""
        full: list[list[str]] = []
        filling: dict[tuple, tuple[list[str], int]] = {}
        for name, counts in candidates.items():
            key = (counts.device, counts[0].numel())
            names, size = filling.get(key, ([], 0))
            if names and counts.device.type == "cpu" and size + counts.numel() > CPU_STACK_ENTRIES:
                full.append(names)
                names, size = [], 0
            filling[key] = (names + [name], size + counts.numel())
        return full + [names for names, _ in filling.values()]

    @staticmethod
    def _stack(names: list[str], candidates: dict[str, torch.Tensor]) -> _Stack:
        rows = [_rows(candidates[n]) for n in names]
        weights = [torch.full((r.shape[0],), 1.0 / r.shape[0], device=r.device) for r in rows]
        return _Stack(names, torch.cat(rows).float(), torch.cat(weights))

    def __call__(self, directions: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor]) -> torch.Tensor:
        """The mean over layers of the mean over each layer's units of the candidates' energy share (float32,
        on the first layer's device)."""
        parts = [
            StackedCandidateEnergy.apply(stack.unit_weights, stack.candidates, *(directions[n] for n in stack.names))
            for stack in self._stacks_checked(directions, candidates)
        ]
        device = parts[0].device
        total = torch.stack([p.to(device) for p in parts]).sum() if len(parts) > 1 else parts[0]
        return total / len(candidates)

    def _stacks_checked(self, directions: dict[str, torch.Tensor], candidates: dict[str, torch.Tensor]) -> list[_Stack]:
        stacks = self.stacks(candidates)
        for stack in stacks:
            device = stack.candidates.device
            moved = [n for n in stack.names if directions[n].device != device]
            if moved:
                raise RuntimeError(
                    f"POF's candidate buffers and weights of {moved[:3]} are on different devices "
                    f"({device} vs {directions[moved[0]].device}): move the whole PrunableModel with .to(device)"
                )
        return stacks
