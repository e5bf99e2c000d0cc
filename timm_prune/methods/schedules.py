"""Sparsity schedules shared by the methods that grow their pruned set during training (GMP, POF's ramp)."""

from __future__ import annotations


def cubic_sparsity(step: int, total_steps: int, initial: float, final: float, start: float, end: float) -> float:
    """Zhu & Gupta's schedule at optimizer step ``step`` of ``total_steps`` (0 before it starts):
    ``final + (initial - final) * (1 - progress) ** 3`` between ``start`` and ``end`` (fractions of the run)."""
    first, last = start * total_steps, end * total_steps
    if step < first:
        return 0.0
    progress = min(1.0, (step - first) / max(last - first, 1e-9))
    return final + (initial - final) * (1.0 - progress) ** 3
