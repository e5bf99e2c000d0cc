"""Wanda: pruning by weights and activations (Sun, Liu, Bair & Kolter 2023, arXiv 2306.11695).

Score of weight ``W[i, j]``: ``S[i, j] = |W[i, j]| * ||X_j||_2``, with ``X_j`` the j-th input feature over all
calibration rows. For a Linear, j is an input feature and the rows are tokens / samples; for a Conv2d, j is a
column of the unfolded input, i.e. an (input channel, kh, kw) entry of the receptive field, and the rows are
all output positions of all images (``capture.input_columns``). A grouped or depthwise conv has its own
features per group: output row i reads the norms of the group it belongs to.

The paper compares scores within each output row ("per output"): every row loses the same fraction of its
weights, the lowest-scored ones. That is ``wanda_keep_mask`` at layer scope, and, with an N:M pattern, the
lowest ``M - N`` of every group of M (``nm.nm_keep_mask``). For a global scope, ``wanda_scores`` gives the
scores of each layer and the caller applies one threshold (``timm_prune.masking.global_keep_masks``); there
the norms should be the root-mean-square ``||X_j||_2 / sqrt(rows)`` (what ``FeatureNorms.norms`` returns) so
that layers with different numbers of rows per image compare; within a row the two rank identically.
"""

from __future__ import annotations

import torch

from .nm import NMPattern, nm_keep_mask, parse_pattern


def feature_norms_per_row(feature_norms: torch.Tensor, out_features: int) -> torch.Tensor:
    """Expand ``(groups, columns)`` feature norms to ``(out_features, columns)``: row i gets its group's norms."""
    if feature_norms.dim() == 1:
        feature_norms = feature_norms.unsqueeze(0)
    groups = feature_norms.shape[0]
    if out_features % groups:
        raise ValueError(f"{out_features} output rows cannot split into {groups} groups")
    return feature_norms.repeat_interleave(out_features // groups, dim=0)


def wanda_scores(weight: torch.Tensor, feature_norms: torch.Tensor) -> torch.Tensor:
    """``|W| * ||X_j||`` shaped like ``weight``.

    Args:
        weight: Linear ``(out, in)`` or Conv2d ``(out, in/groups, kh, kw)``.
        feature_norms: ``(groups, columns)`` input-feature norms (``FeatureNorms.norms()``), columns in the order
            of ``weight[i].reshape(-1)``; a 1-D tensor is one group.
    """
    w = weight.detach().reshape(weight.shape[0], -1)
    norms = feature_norms_per_row(feature_norms.detach().to(device=w.device), w.shape[0])
    if norms.shape != w.shape:
        raise ValueError(
            f"feature norms of shape {tuple(feature_norms.shape)} do not fit a weight of shape {tuple(weight.shape)}"
        )
    return (w.abs().to(norms.dtype) * norms).reshape(weight.shape)


def row_keep_mask(scores: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Per output row (dim 0), prune the ``round(sparsity * row_size)`` lowest scores; ties pruned in storage order."""
    if not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is invalid; expected a number in [0, 1)")
    flat = scores.detach().reshape(scores.shape[0], -1)
    k = min(flat.shape[1], int(round(sparsity * flat.shape[1])))
    keep = torch.ones(flat.shape, dtype=torch.bool, device=flat.device)
    if k:
        lowest = torch.sort(flat.to(torch.float32), dim=1, stable=True).indices[:, :k]
        keep.scatter_(1, lowest, False)
    return keep.reshape(scores.shape)


def wanda_keep_mask(
    weight: torch.Tensor,
    feature_norms: torch.Tensor,
    sparsity: float = 0.5,
    pattern: str | tuple[int, int] | NMPattern | None = None,
) -> torch.Tensor:
    """Wanda's keep-mask at layer scope: per output row at ``sparsity``, or N:M when ``pattern`` is given."""
    scores = wanda_scores(weight, feature_norms)
    parsed = parse_pattern(pattern)
    if parsed is not None:
        return nm_keep_mask(scores, parsed)
    return row_keep_mask(scores, sparsity)


__all__ = ["feature_norms_per_row", "row_keep_mask", "wanda_keep_mask", "wanda_scores"]
