"""PSAP's selection arithmetic, free of any model: the pruning schedule, the adaptive per-group filter counts,
the protective rule and the within-group choice (see ``timm_prune.methods.psap`` for the formulation).

Everything here works on flat per-filter tensors ("filter" = one channel of a channel group, i.e. one gate in
``structured.groups.ChannelGroup`` terms) plus the group layout ``(offset, num_filters)``; nothing reads a module.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from ..structured.measure import refill

# Sparsity floor: a group with no near-zero weight still gets a (small) share, so the budget stays reachable.
SPARSITY_FLOOR = 1e-3


def schedule_fraction(k: int, steps: int, kind: str) -> float:
    """Share of the final target reached after pruning step ``k`` of ``steps`` (1-based): linear or cubic."""
    t = min(max(k / steps, 0.0), 1.0)
    return t if kind == "linear" else 1.0 - (1.0 - t) ** 3


def group_caps(sizes: list[int], max_ratio: float) -> list[int]:
    """Most filters each group may lose: ``floor(max_ratio * n)``, and never its last filter."""
    return [min(math.floor(max_ratio * n + 1e-9), n - 1) for n in sizes]


def adaptive_weights(sparsity: list[float], adaptivity: float) -> list[float]:
    """Per-group share of the budget before rescaling: ``max(s, floor) ** adaptivity`` (0: uniform ratios)."""
    return [max(s, SPARSITY_FLOOR) ** adaptivity for s in sparsity]


def _real_counts(lam: float, sizes: list[int], caps: list[int], weights: list[float]) -> list[float]:
    return [min(float(c), lam * w * n) for n, c, w in zip(sizes, caps, weights, strict=True)]


def allocate_counts(sizes: list[int], caps: list[int], weights: list[float], total: int) -> list[int]:
    """Integer filters to prune per group, summing to exactly ``total``.

    The ratio of group g is ``min(cap_g / n_g, lam * w_g)``: proportional to its weight ``w_g`` until the group
    hits its cap; ``lam`` is solved (bisection) so the real counts sum to ``total``, then rounded by largest
    remainder under the caps. Raises ``ValueError`` when ``total`` exceeds what the caps allow.
    """
    if total > sum(caps):
        raise ValueError(f"cannot prune {total} filters: the groups allow at most {sum(caps)}")
    if total <= 0:
        return [0] * len(sizes)
    lo, hi = 0.0, max(c / (w * n) for n, c, w in zip(sizes, caps, weights, strict=True) if n > 0)
    for _ in range(200):  # sum of real counts is continuous and non-decreasing in lam
        mid = 0.5 * (lo + hi)
        if sum(_real_counts(mid, sizes, caps, weights)) < total:
            lo = mid
        else:
            hi = mid
    real = _real_counts(hi, sizes, caps, weights)
    counts = [min(math.floor(x + 1e-9), c) for x, c in zip(real, caps, strict=True)]
    # Largest remainder first (ties: group order), only where the cap leaves room; a second pass covers the
    # rare rounding case where fewer groups than needed have a non-zero remainder.
    order = sorted(range(len(sizes)), key=lambda g: (-(real[g] - counts[g]), g))
    while sum(counts) < total:
        for g in order:
            if sum(counts) >= total:
                break
            if counts[g] < caps[g]:
                counts[g] += 1
    while sum(counts) > total:  # floor + epsilon may overshoot by a filter in degenerate ties
        g = max((g for g in range(len(sizes)) if counts[g] > 0), key=lambda g: (counts[g] - real[g], -g))
        counts[g] -= 1
    return counts


def counts_for(lam: float, sizes: list[int], caps: list[int], weights: list[float]) -> list[int]:
    """Integer counts ``floor(min(cap, lam * w * n))``: non-decreasing in ``lam`` (FLOPs-target bisection)."""
    return [min(math.floor(x + 1e-9), c) for x, c in zip(_real_counts(lam, sizes, caps, weights), caps, strict=True)]


def protected_filters(
    scores: torch.Tensor, kept: torch.Tensor, layout: list[tuple[int, int]], quantile: float
) -> torch.Tensor:
    """The protective rule: filter f of group g is protected when ``score_f`` exceeds the ``quantile`` of the
    scores of g's kept filters. Kept filters so protected are not pruned this step; pruned ones come back."""
    out = torch.zeros_like(kept)
    for off, n in layout:
        s, k = scores[off : off + n].double(), kept[off : off + n]
        if not bool(k.any()):
            continue
        out[off : off + n] = s > float(torch.quantile(s[k], quantile))
    return out


def select(
    counts: list[int],
    layout: list[tuple[int, int]],
    magnitude: torch.Tensor,
    scores: torch.Tensor,
    protected: torch.Tensor,
) -> torch.Tensor:
    """Pruned-filter mask: in each group, the ``count`` unprotected filters of lowest magnitude; if the group has
    fewer unprotected filters than its count, the protected ones with the lowest gradient score follow."""
    pruned = torch.zeros(magnitude.numel(), dtype=torch.bool)
    for (off, n), count in zip(layout, counts, strict=True):
        if count <= 0:
            continue
        order = ranking(magnitude[off : off + n], scores[off : off + n], protected[off : off + n])
        pruned[off + order[:count]] = True
    return pruned


def ranking(magnitude: torch.Tensor, scores: torch.Tensor, protected: torch.Tensor) -> torch.Tensor:
    """Local filter indices in pruning order (first = pruned first); stable, so ties keep channel order."""
    free = torch.nonzero(~protected).flatten()
    guarded = torch.nonzero(protected).flatten()
    free = free[torch.argsort(magnitude[free], stable=True)]
    guarded = guarded[torch.argsort(scores[guarded], stable=True)]
    return torch.cat([free, guarded])


def plan_flops(
    budget: float,
    sizes: list[int],
    caps: list[int],
    weights: list[float],
    layout: list[tuple[int, int]],
    magnitude: torch.Tensor,
    scores: torch.Tensor,
    protected: torch.Tensor,
    flops: Callable[[torch.Tensor], float],
    tolerance: float = 0.005,
    max_refill: int = 512,
) -> torch.Tensor:
    """Pruned-filter mask whose FLOPs (``flops(keep)``) are the largest not above ``budget``.

    ``lam`` of the adaptive counts is bisected (FLOPs do not increase with it); then removed filters are given
    back (protected first, then by magnitude) while they fit, until within ``tolerance`` of the budget. Raises
    ``ValueError`` when even the capped counts leave more than the budget.
    """

    def pruned_for(lam: float) -> torch.Tensor:
        return select(counts_for(lam, sizes, caps, weights), layout, magnitude, scores, protected)

    lam_max = max(c / (w * n) for n, c, w in zip(sizes, caps, weights, strict=True))
    floor = flops(~pruned_for(lam_max))
    if floor > budget:
        raise ValueError(f"the budget {budget / 1e6:.3f} MFLOPs is below what the caps allow ({floor / 1e6:.3f})")
    lo, hi = 0.0, lam_max
    if flops(~pruned_for(0.0)) <= budget:
        hi = 0.0
    for _ in range(60):
        if hi - lo <= 1e-12 * lam_max:
            break
        mid = 0.5 * (lo + hi)
        if flops(~pruned_for(mid)) <= budget:
            hi = mid
        else:
            lo = mid
    pruned = pruned_for(hi)
    candidates = torch.nonzero(pruned).flatten().tolist()
    candidates.sort(key=lambda i: (not bool(protected[i]), -float(magnitude[i])))
    return ~refill(~pruned, candidates, flops, budget, tolerance, max_refill)
