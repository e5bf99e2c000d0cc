"""SparseGPT: one-shot pruning with an optimal-brain-surgeon update (Frantar & Alistarh 2023, arXiv 2301.00774).

Problem, per layer and per output row ``w`` (a row of ``W``, the layer flattened to ``(out, columns)``): keep a
subset of the entries and choose their values ``w'`` to minimise the layer-wise reconstruction error on the
calibration inputs ``X`` (``columns x rows``, from ``capture.input_columns``):

    ||w X - w' X||^2,   Hessian  H = 2 X X^T / rows   (the same for every row of the layer or conv group).

Solve (our implementation of the paper's algorithm):

1. ``H += damp * mean(diag H) * I`` (``percdamp`` 0.01 by default). Dead inputs (``H_jj = 0``, a column that
   is zero on every calibration row) get ``H_jj = 1``: they cannot change the output on the calibration set,
   so they rank first for pruning (saliency 0) and receive no update; a dead column that stays kept keeps its
   value (SparseGPT zeroes them; we do not, since inputs dead on a few calibration images need not be dead
   on all images).
2. ``U = chol(H^-1)``, upper: row j of U holds, for the columns ``j..`` still free when column j is reached,
   ``[H_F^-1]_{j,:} / sqrt([H_F^-1]_jj)``; columns are processed left to right, and ``U_jj^2`` is the OBS
   denominator ``[H_F^-1]_jj``.
3. Columns go in blocks of ``blocksize`` (128). At the start of a block, the mask of the block is chosen
   from the current (already updated) weights by the OBS saliency ``w_j^2 / U_jj^2``: per row, the
   ``round(p * end) - round(p * start)`` lowest (so every row ends with exactly ``round(p * columns)``
   pruned: per-row sparsity, the paper selects across all rows of the block instead). With an N:M pattern the
   mask of each group of M columns is chosen when the group's first column is reached (exactly N kept).
   A given ``keep`` mask replaces the selection.
4. Column j: ``err = (w_j - keep_j * w_j) / U_jj``; ``w_{j:} -= err * U_{j, j:}`` (the OBS update of the
   remaining columns; it sets a pruned ``w_j`` to zero). Inside a block the column recursion is solved at
   once as one batched triangular system per block (per group of M columns with a pattern), instead of a
   Python loop over columns; the columns after the block get the update lazily, one matrix product per block.

For a fixed mask whose pruned entries come before the kept ones in column order, the result is the exact
least-squares optimum of the kept weights; for any mask it equals the sequential OBS elimination in column
order. Conv2d weights ``(out, in/g, kh, kw)`` are flattened per output channel; a conv with g groups is g
independent problems with their own Hessians ``(g, columns, columns)``, solved batched. With an N:M pattern
on a conv, the columns are visited in ``(kh, kw, channel)`` order so that each group of M input channels
(``nm`` module) is contiguous.

Work is in float32 (float64 when the weight is float64).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .nm import NMPattern, nm_keep_mask_lastdim, parse_pattern

# Largest batch of triangular systems (elements) solved at once in a block: 4M = 16 MB in float32.
_SOLVE_ELEMENTS = 1 << 22


@dataclass
class SparseGPTResult:
    """The pruned and updated weight (input shape and dtype), its keep mask, and the solve's diagnostics."""

    weight: torch.Tensor
    keep: torch.Tensor
    # Sum over rows of the OBS error estimates, sum_j (w_j - w'_j)^2 / U_jj^2 / 2 at the moment of pruning.
    loss: float
    # Relative damping actually used (more than asked when H + damp * I was not positive definite).
    damp: float


def _as_groups(weight: torch.Tensor, hessian: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    rows = weight.shape[0]
    w = weight.reshape(rows, -1)
    h = hessian.unsqueeze(0) if hessian.dim() == 2 else hessian
    groups, columns = h.shape[0], h.shape[-1]
    if h.dim() != 3 or h.shape[1] != columns or w.shape[1] != columns or rows % groups:
        raise ValueError(
            f"hessian of shape {tuple(hessian.shape)} does not fit a weight of shape {tuple(weight.shape)}; "
            "expected (columns, columns) or (groups, columns, columns) with columns = weight[0].numel()"
        )
    return w.reshape(groups, rows // groups, columns), h


def _channel_last_order(weight_shape: torch.Size) -> torch.Tensor | None:
    """Column permutation ``(c, kh, kw) -> (kh, kw, c)`` for conv weights; None for linear ones."""
    if len(weight_shape) <= 2:
        return None
    inner = weight_shape[1:]
    return torch.arange(int(torch.tensor(inner).prod())).reshape(inner).movedim(0, -1).reshape(-1)


def damped_inverse_cholesky(hessian: torch.Tensor, percdamp: float = 0.01) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(U, dead, damp)``: upper Cholesky factor of ``(H + damp * mean(diag) * I)^-1`` per group, dead columns.

    ``hessian``: ``(groups, columns, columns)``. Dead columns (zero diagonal) get a unit diagonal first. When
    the damped matrix is not positive definite (numerically), the damping grows tenfold, up to six times.
    """
    h = hessian.clone()
    diag = torch.diagonal(h, dim1=-2, dim2=-1)
    dead = diag == 0
    live_mean = (diag * ~dead).sum(-1) / (~dead).sum(-1).clamp_min(1)
    live_mean = torch.where((~dead).any(-1), live_mean, torch.ones_like(live_mean))
    diag.add_(dead.to(h.dtype))
    eye = torch.eye(h.shape[-1], dtype=h.dtype, device=h.device)
    damp = float(percdamp)
    for _ in range(7):
        damped = h + eye * (damp * live_mean)[:, None, None]
        chol, info = torch.linalg.cholesky_ex(damped)
        if not bool(info.any()):
            inverse = torch.cholesky_inverse(chol)
            upper, info = torch.linalg.cholesky_ex(inverse, upper=True)
            if not bool(info.any()):
                return upper, dead, damp
        damp = max(damp * 10.0, 1e-6)
    raise RuntimeError("sparsegpt: the damped Hessian is not positive definite; check the calibration inputs")


def obs_scores(weight: torch.Tensor, hessian: torch.Tensor, percdamp: float = 0.01) -> torch.Tensor:
    """OBS saliency of removing each weight alone, ``w_ij^2 / [H^-1]_jj``, shaped like ``weight``.

    A ranking for a global threshold across layers (dead inputs score 0); the per-layer solve then prunes each
    layer at the sparsity that threshold gives it.
    """
    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w, h = _as_groups(weight.detach().to(dtype), hessian.detach().to(dtype=dtype, device=weight.device))
    upper, dead, _ = damped_inverse_cholesky(h, percdamp)
    inv_diag = (upper.square()).sum(-2)  # diag(U^T U) = diag(H^-1)
    scores = w.square() / inv_diag[:, None, :]
    scores = scores.masked_fill(dead[:, None, :], 0.0)
    return scores.reshape(weight.shape)


def _row_select(saliency: torch.Tensor, k: int) -> torch.Tensor:
    """Keep-mask over the last dim: the ``k`` lowest saliencies of each row pruned (stable order for ties)."""
    keep = torch.ones(saliency.shape, dtype=torch.bool, device=saliency.device)
    if k > 0:
        keep.scatter_(-1, torch.sort(saliency, dim=-1, stable=True).indices[..., :k], False)
    return keep


def _saliency(w: torch.Tensor, u: torch.Tensor, dead: torch.Tensor) -> torch.Tensor:
    """OBS error of pruning each entry now, ``w_j^2 / U_jj^2`` (0 for dead inputs); ``w`` is ``(groups, rows, k)``."""
    d = torch.diagonal(u, dim1=-2, dim2=-1)[:, None, :]
    return (w.square() / d.square()).masked_fill(dead, 0.0)


def _eliminate(w: torch.Tensor, keep: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
    """Prune the ``~keep`` entries of a block of columns, left to right, updating the block in place.

    Column j, in order: ``e_j = (w_j - keep_j w_j) / U_jj`` on the current (updated) ``w_j``, then
    ``w_{j:} -= e_j U_{j, j:}``. The whole recursion at once: with ``w`` the block before any update,
    ``e_j = 0`` for kept j and ``sum_{i <= j} e_i U_ij = w_j`` for pruned j, a triangular system per row,
    ``e A = w * pruned`` with ``A[:, j] = U[:, j]`` for pruned j and the unit vector for kept j. Then
    ``w -= e U``. Returns the errors ``e`` (the lazy update of the columns after the block needs them).
    """
    groups, rows, width = w.shape
    pruned = ~keep
    eye = torch.eye(width, dtype=w.dtype, device=w.device)
    rhs = (w * pruned).unsqueeze(-2)  # (groups, rows, 1, width)
    errors = torch.empty_like(w)
    step = max(1, _SOLVE_ELEMENTS // (groups * width * width))
    for start in range(0, rows, step):
        part = slice(start, start + step)
        system = torch.where(pruned[:, part, None, :], u[:, None], eye)  # (groups, step, width, width), upper
        errors[:, part] = torch.linalg.solve_triangular(system, rhs[:, part], upper=True, left=False).squeeze(-2)
    w -= errors @ u
    return errors


def sparsegpt_prune(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    sparsity: float = 0.5,
    *,
    pattern: str | tuple[int, int] | NMPattern | None = None,
    keep: torch.Tensor | None = None,
    blocksize: int = 128,
    percdamp: float = 0.01,
) -> SparseGPTResult:
    """Prune one layer with SparseGPT (module docstring) and return the updated weight and its keep mask.

    Args:
        weight: Linear ``(out, in)`` or Conv2d ``(out, in/groups, kh, kw)``; not modified.
        hessian: ``2 X X^T / rows`` of the layer input, ``(columns, columns)`` or ``(groups, columns, columns)``
            (``capture.InputHessian.hessian()``), columns in the order of ``weight[i].reshape(-1)``.
        sparsity: fraction of each output row pruned (ignored with ``pattern`` or ``keep``).
        pattern: N:M pattern such as ``"2:4"`` (``nm`` module grouping).
        keep: a fixed boolean keep mask shaped like ``weight``; only the update is computed.
        blocksize: columns per lazy-update block (rounded down to a multiple of M with a pattern).
        percdamp: relative damping of the Hessian diagonal.
    """
    parsed = parse_pattern(pattern)
    if keep is None and parsed is None and not 0.0 <= sparsity < 1.0:
        raise ValueError(f"sparsity={sparsity!r} is invalid; expected a number in [0, 1)")
    if blocksize < 1:
        raise ValueError(f"blocksize={blocksize!r} is invalid; expected an integer >= 1")
    if percdamp < 0:
        raise ValueError(f"percdamp={percdamp!r} is invalid; expected a number >= 0")
    if keep is not None and tuple(keep.shape) != tuple(weight.shape):
        raise ValueError(f"keep of shape {tuple(keep.shape)} does not match the weight's {tuple(weight.shape)}")
    if parsed is not None and keep is None:
        if weight.dim() < 2 or weight.shape[1] % parsed.m:
            raise ValueError(
                f"pattern='{parsed}' cannot apply to a weight of shape {tuple(weight.shape)}: dim 1 "
                f"({weight.shape[1] if weight.dim() > 1 else 0}) is not a multiple of M={parsed.m}"
            )
        blocksize = max(parsed.m, blocksize // parsed.m * parsed.m)

    dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    w, h = _as_groups(weight.detach().to(dtype).clone(), hessian.detach().to(dtype=dtype, device=weight.device))
    fixed = None if keep is None else keep.detach().to(torch.bool).reshape(w.shape)
    order = _channel_last_order(weight.shape) if parsed is not None and keep is None else None
    if order is not None:
        w, h = w[..., order], h[:, order][:, :, order]
    w = w.contiguous()
    upper, dead, damp = damped_inverse_cholesky(h, percdamp)

    columns = w.shape[-1]
    mask = torch.ones(w.shape, dtype=torch.bool, device=w.device)
    loss = torch.zeros((), dtype=dtype, device=w.device)
    for i1 in range(0, columns, blocksize):
        i2 = min(i1 + blocksize, columns)
        w1 = w[..., i1:i2].clone()
        u1 = upper[:, i1:i2, i1:i2]
        dead1 = dead[:, None, i1:i2]
        if parsed is None or fixed is not None:
            if fixed is not None:
                m1 = fixed[..., i1:i2]
            else:
                k = int(round(sparsity * i2)) - int(round(sparsity * i1))
                m1 = _row_select(_saliency(w1, u1, dead1), k)
            errors = _eliminate(w1, m1, u1)
        else:  # N:M: each group's mask is chosen once the columns before it have been updated
            m1 = torch.ones(w1.shape, dtype=torch.bool, device=w.device)
            errors = torch.zeros_like(w1)
            for j in range(0, i2 - i1, parsed.m):
                g = slice(j, j + parsed.m)
                m1[..., g] = nm_keep_mask_lastdim(_saliency(w1[..., g], u1[:, g, g], dead1[..., g]), parsed.n, parsed.m)
                errors[..., g] = _eliminate(w1[..., g], m1[..., g], u1[:, g, g])
                w1[..., j + parsed.m :] -= errors[..., g] @ u1[:, g, j + parsed.m :]
        loss = loss + errors.square().sum() / 2
        w[..., i1:i2] = w1.masked_fill(~m1, 0.0)
        mask[..., i1:i2] = m1
        if i2 < columns:
            w[..., i2:] -= errors @ upper[:, i1:i2, i2:]

    if order is not None:
        inverse = torch.argsort(order)
        w, mask = w[..., inverse], mask[..., inverse]
    new_weight = w.reshape(weight.shape).to(weight.dtype)
    return SparseGPTResult(weight=new_weight, keep=mask.reshape(weight.shape), loss=float(loss), damp=damp)


__all__ = ["SparseGPTResult", "damped_inverse_cholesky", "obs_scores", "sparsegpt_prune"]
