"""Thresholds, keep-masks and data-free recovery statistics (the reports live in ``reports.py``).

Everything here works one layer at a time. The global threshold in particular never concatenates the
model's weights: it is an exact radix selection on the bit patterns of the (non-negative) scores,
two counting passes over the layers, so its extra memory is one chunk plus two small histograms.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence

import torch

from .config import RECOVERY_KINDS
from .reports import LayerReport, PruneReport  # noqa: F401  (re-exported: their historical home)

# Bits of a float32 split between the two radix passes: 2**16 + 2**15 counters.
_HIGH_SHIFT = 15
_CHUNK = 1 << 22


def num_to_prune(numel: int, sparsity: float) -> int:
    return min(numel, int(round(sparsity * numel)))


def _chunks(t: torch.Tensor) -> Iterator[torch.Tensor]:
    flat = t.reshape(-1)
    for start in range(0, flat.numel(), _CHUNK):
        yield flat[start : start + _CHUNK]


def _as_bits(x: torch.Tensor) -> torch.Tensor:
    # For non-negative float32 values, the int32 bit pattern orders exactly like the value.
    return x.to(torch.float32).clamp_min(0.0).contiguous().view(torch.int32)


def _add_counts(counts: torch.Tensor | None, found: torch.Tensor) -> torch.Tensor:
    # The counts live where the first layer's scores are (a model on a GPU counts there); a layer on another
    # device (a model split over several) sends its counts over.
    return found if counts is None else counts.add_(found.to(counts.device))


def _high_histogram(scores: Sequence[Callable[[], torch.Tensor]]) -> torch.Tensor:
    counts = None
    for score_fn in scores:
        for chunk in _chunks(score_fn()):
            counts = _add_counts(counts, torch.bincount(_as_bits(chunk) >> _HIGH_SHIFT, minlength=1 << 16))
    return torch.zeros(1 << 16, dtype=torch.int64) if counts is None else counts


def kth_smallest(
    scores: Sequence[Callable[[], torch.Tensor]], k: int, high_counts: torch.Tensor | None = None
) -> float:
    """Exact k-th smallest (1-based) of all values produced by ``scores`` (non-negative), in two passes.

    Each callable returns one layer's scores; it is called once per pass, so scores may be computed
    on the fly from the weights instead of being held in memory. ``high_counts``: the first pass's
    histogram when the caller already has it.
    """
    if k < 1:
        raise ValueError(f"kth_smallest needs k >= 1; got {k}")
    high_counts = _high_histogram(scores) if high_counts is None else high_counts
    cumulative = high_counts.cumsum(0)
    if cumulative[-1] < k:
        raise ValueError(f"kth_smallest: asked for element {k} of {int(cumulative[-1])}")
    bucket = int(torch.searchsorted(cumulative, k))
    rank_in_bucket = k - (int(cumulative[bucket - 1]) if bucket > 0 else 0)
    low_counts = None
    for score_fn in scores:
        for chunk in _chunks(score_fn()):
            bits = _as_bits(chunk)
            in_bucket = bits[(bits >> _HIGH_SHIFT) == bucket]
            found = torch.bincount(in_bucket & ((1 << _HIGH_SHIFT) - 1), minlength=1 << _HIGH_SHIFT)
            low_counts = _add_counts(low_counts, found)
    low = int(torch.searchsorted(low_counts.cumsum(0), rank_in_bucket))
    value_bits = torch.tensor([(bucket << _HIGH_SHIFT) | low], dtype=torch.int32)
    return float(value_bits.view(torch.float32))


def _keep_below_threshold(score: torch.Tensor, threshold: float, ties_to_prune: int) -> tuple[torch.Tensor, int]:
    """Keep-mask removing every score < threshold and the first ``ties_to_prune`` scores == threshold."""
    score = score.to(torch.float32)
    prune = score < threshold
    ties = score == threshold
    n_ties = int(torch.count_nonzero(ties))
    if ties_to_prune > 0 and n_ties:
        take = min(ties_to_prune, n_ties)
        order = ties.reshape(-1).cumsum(0).reshape(ties.shape)
        prune |= ties & (order <= take)
        ties_to_prune -= take
    return ~prune, ties_to_prune


def layer_keep_mask(score: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Keep-mask that prunes exactly ``round(sparsity * numel)`` lowest scores (ties in storage order)."""
    k = num_to_prune(score.numel(), sparsity)
    if k == 0:
        return torch.ones_like(score, dtype=torch.bool)
    flat = score.detach().reshape(-1).to(torch.float32)
    threshold = float(flat.kthvalue(k).values)
    below = int(torch.count_nonzero(flat < threshold))
    keep, _ = _keep_below_threshold(score.detach(), threshold, k - below)
    return keep


def _sorted_lamp(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Along the last dimension (each row a layer, or a sample of one): the squared scores in ascending order, the
    order, and their LAMP scores (see ``lamp_scores``)."""
    squared = scores.detach().to(torch.float32).square()
    # The sort is the cost (POF re-selects its candidates every few steps): float32 sorts faster than float64;
    # the sums run in float64, where a long tail of small squares is not rounded away.
    ascending, order = torch.sort(squared, dim=-1, stable=True)
    wide = ascending.to(torch.float64)
    at_least = wide.flip(-1).cumsum(-1).flip(-1)  # sum of the entries from this one to the largest
    lamp = (wide / at_least.clamp_min(torch.finfo(torch.float64).tiny)).to(torch.float32)
    # Non-decreasing in exact arithmetic (a larger numerator over a smaller sum); cummax irons out rounding.
    return ascending, order, torch.cummax(lamp, -1).values


def lamp_scores(scores: torch.Tensor) -> torch.Tensor:
    """LAMP scores of one layer (Lee et al., "Layer-adaptive Sparsity for the Magnitude-based Pruning", ICLR 2021):
    each entry's squared score over the sum of the squared scores that are at least as large (itself included), in
    the shape of ``scores``. Within a layer the order is unchanged; across layers the scale is gone, and every
    layer's largest entry scores 1, so one global threshold below 1 never empties a layer. Ties are broken by
    storage order (sorting is stable)."""
    _, order, lamp = _sorted_lamp(scores.reshape(-1))
    out = torch.empty_like(lamp)
    out[order] = lamp
    return out.reshape(scores.shape)


def sorted_lamp_scores(scores: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``|scores|`` in ascending order and their LAMP scores, ascending too (an entry's LAMP score grows with its
    rank), along the last dimension: a 1-D tensor is one layer, each row of a 2-D one a layer of its own (one sort
    for many layers of one size). A threshold on LAMP scores maps to one on ``|scores|`` without scattering back."""
    ascending, _, lamp = _sorted_lamp(scores)
    return ascending.sqrt(), lamp


def global_keep_masks(scores: Sequence[Callable[[], torch.Tensor]], sparsity: float) -> list[torch.Tensor]:
    """Keep-masks with one threshold over all layers, pruning exactly ``round(sparsity * total)`` entries.

    Three computations of each layer's scores (two radix passes, one masking pass); a layer is visited once
    more only if it holds entries exactly at the threshold that are needed to reach the count.
    """
    high_counts = _high_histogram(scores)
    k = num_to_prune(int(high_counts.sum()), sparsity)
    if k == 0:
        return [torch.ones_like(fn(), dtype=torch.bool) for fn in scores]
    threshold = kth_smallest(scores, k, high_counts)
    masks, tie_counts, below = [], [], 0
    for score_fn in scores:
        score = score_fn().detach().to(torch.float32)
        keep = score > threshold
        n_below = int(torch.count_nonzero(score < threshold))
        below += n_below
        tie_counts.append(score.numel() - n_below - int(torch.count_nonzero(keep)))
        masks.append(keep)
    ties_left = k - below
    # Entries equal to the threshold: the first ones in layer and storage order are pruned, the rest kept.
    for index, (score_fn, n_ties) in enumerate(zip(scores, tie_counts, strict=True)):
        if n_ties:
            masks[index], ties_left = _keep_below_threshold(score_fn().detach(), threshold, ties_left)
    return masks


def _unit_view(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)


def recovery_statistics(weight: torch.Tensor, keep: torch.Tensor, kind: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-output-unit ``(mean, scale)`` of a data-free recovery, from the weight before pruning.

    The recovered layer acts as the dense weight ``scale * w`` on kept entries and ``mean`` on pruned ones:
    - ``"mean"``: mean of each unit's pruned entries (0 for a unit with none pruned), scale 1;
    - ``"layer_mean"``: the mean of all the layer's pruned entries, for every unit, scale 1;
    - ``"renorm"``: no mean; each unit's kept weights rescaled to the unit's norm before pruning;
    - ``"none"``: mean 0, scale 1.
    """
    if kind == "none":
        w = _unit_view(weight)
        return torch.zeros(w.shape[0], device=w.device), torch.ones(w.shape[0], device=w.device)
    if kind not in RECOVERY_KINDS:
        raise ValueError(f"unknown recovery {kind!r}; expected 'mean', 'layer_mean', 'renorm' or 'none'")
    return all_recovery_statistics(weight, keep)[kind]


def all_recovery_statistics(weight: torch.Tensor, keep: torch.Tensor) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """``recovery_statistics`` of every kind in ``RECOVERY_KINDS`` at once, sharing the passes over the weight."""
    w = _unit_view(weight.detach().to(torch.float32))
    kept = _unit_view(keep)
    n_units = w.shape[0]
    zeros = torch.zeros(n_units, dtype=torch.float32, device=w.device)
    ones = torch.ones(n_units, dtype=torch.float32, device=w.device)
    w_kept = w * kept
    pruned_sum = w.sum(1) - w_kept.sum(1)
    n_pruned = kept.shape[1] - kept.sum(1)
    kept_norm = torch.linalg.vector_norm(w_kept, dim=1)
    renorm = torch.where(kept_norm > 0, torch.linalg.vector_norm(w, dim=1) / kept_norm.clamp_min(1e-30), ones)
    return {
        "mean": (pruned_sum / n_pruned.clamp_min(1), ones),
        "layer_mean": (zeros + pruned_sum.sum() / n_pruned.sum().clamp_min(1), ones),
        "renorm": (zeros, renorm),
    }


def count_zeros(t: torch.Tensor) -> int:
    return t.numel() - int(torch.count_nonzero(t))


def fraction(n: int, d: int) -> float:
    return n / d if d else math.nan
