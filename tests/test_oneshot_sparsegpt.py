"""SparseGPT's per-layer solve (timm_prune.oneshot.sparsegpt) against dense references."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from timm_prune.oneshot.capture import InputHessian, capture_all, input_columns
from timm_prune.oneshot.nm import is_nm, nm_keep_mask
from timm_prune.oneshot.sparsegpt import obs_scores, sparsegpt_prune
from timm_prune.oneshot.wanda import row_keep_mask


def correlated_inputs(columns: int, rows: int, rho: float = 0.9, seed: int = 0, dtype=torch.float32) -> torch.Tensor:
    """``(columns, rows)``: AR(1)-correlated features with log-normal scales (like real activations)."""
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(columns, dtype=torch.float64)
    cov = rho ** (idx[:, None] - idx[None]).abs()
    x = torch.linalg.cholesky(cov) @ torch.randn(columns, rows, generator=g, dtype=torch.float64)
    scales = torch.exp(torch.randn(columns, generator=g, dtype=torch.float64))
    return (scales[:, None] * x).to(dtype)


def hessian_of(x: torch.Tensor) -> torch.Tensor:
    return 2 * x @ x.T / x.shape[1]


def output_error(w: torch.Tensor, w_new: torch.Tensor, x: torch.Tensor) -> float:
    return float(((w - w_new) @ x).square().sum())


def least_squares(w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Per row, the kept weights minimising ||w X - w' X||: w'_K = H_KK^-1 H_K: w (pruned entries 0)."""
    out = torch.zeros_like(w)
    for r in range(w.shape[0]):
        k = keep[r].nonzero().squeeze(1)
        out[r, k] = torch.linalg.solve(h[k][:, k], h[k] @ w[r])
    return out


def sequential_obs(w: torch.Tensor, keep: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """Textbook OBS, column by column with explicit inverses: pruning column j moves the columns after it by
    -w_j / [H_F^-1]_jj * [H_F^-1]_{:,j}, F = {j, ..., end}; a kept column is then frozen."""
    w = w.clone()
    n = w.shape[1]
    for r in range(w.shape[0]):
        for j in range(n):
            if not keep[r, j]:
                inv = torch.linalg.inv(h[j:, j:])
                w[r, j:] -= w[r, j] / inv[0, 0] * inv[:, 0]
                w[r, j] = 0.0
    return w


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_lower_output_error_than_magnitude_and_wanda(sparsity):
    torch.manual_seed(0)
    x = correlated_inputs(96, 768)
    w = torch.randn(48, 96)
    result = sparsegpt_prune(w, hessian_of(x), sparsity)
    magnitude = w * row_keep_mask(w.abs(), sparsity)
    wanda = w * row_keep_mask(w.abs() * x.square().mean(1).sqrt(), sparsity)
    err = output_error(w, result.weight, x)
    assert err < 0.5 * output_error(w, magnitude, x)
    assert err < output_error(w, wanda, x)
    # Exactly the asked sparsity in every row, and the pruned entries are exact zeros.
    assert (result.keep.sum(1) == 96 - round(sparsity * 96)).all()
    assert (result.weight[~result.keep] == 0).all()
    assert result.weight.dtype == torch.float32


@pytest.mark.parametrize("blocksize", [24, 7, 1])
def test_equals_least_squares_when_pruned_columns_come_first(blocksize):
    # For a mask that prunes a prefix of each row's columns, sequential OBS is the exact least-squares optimum.
    x = correlated_inputs(24, 200, rho=0.7, seed=1, dtype=torch.float64)
    h = hessian_of(x)
    w = torch.randn(6, 24, dtype=torch.float64, generator=torch.Generator().manual_seed(2))
    keep = torch.ones_like(w, dtype=torch.bool)
    for r, prefix in enumerate([0, 3, 8, 12, 17, 23]):
        keep[r, :prefix] = False
    result = sparsegpt_prune(w, h, keep=keep, blocksize=blocksize, percdamp=0.0)
    torch.testing.assert_close(result.weight, least_squares(w, keep, h), rtol=1e-8, atol=1e-8)
    assert torch.equal(result.keep, keep)


@pytest.mark.parametrize("blocksize", [20, 6])
def test_equals_textbook_obs_for_any_mask(blocksize):
    x = correlated_inputs(20, 150, rho=0.8, seed=3, dtype=torch.float64)
    h = hessian_of(x)
    g = torch.Generator().manual_seed(4)
    w = torch.randn(5, 20, dtype=torch.float64, generator=g)
    keep = torch.rand(5, 20, generator=g) > 0.5
    result = sparsegpt_prune(w, h, keep=keep, blocksize=blocksize, percdamp=0.0)
    torch.testing.assert_close(result.weight, sequential_obs(w, keep, h), rtol=1e-8, atol=1e-8)
    # Never better than the least-squares optimum for the same mask, and far better than zeroing alone.
    best = output_error(w, least_squares(w, keep, h), x)
    err = output_error(w, result.weight, x)
    assert best <= err * (1 + 1e-9) and err < output_error(w, w * keep, x)


def test_nm_pattern_linear_and_conv():
    torch.manual_seed(0)
    x = correlated_inputs(64, 512)
    w = torch.randn(16, 64)
    result = sparsegpt_prune(w, hessian_of(x), pattern="2:4")
    assert is_nm(result.keep, "2:4") and (result.weight[~result.keep] == 0).all()
    assert output_error(w, result.weight, x) < output_error(w, w * nm_keep_mask(w.abs(), "2:4"), x)

    conv = nn.Conv2d(8, 6, 3, padding=1, bias=False)
    images = torch.randn(4, 8, 6, 6)
    stats = capture_all(conv, {"c": conv}, [images], lambda n, m: InputHessian(m))["c"]
    result = sparsegpt_prune(conv.weight, stats.hessian(), pattern="2:4", blocksize=8)
    assert is_nm(result.keep, "2:4") and result.keep.shape == conv.weight.shape
    assert (result.weight[~result.keep] == 0).all()
    with pytest.raises(ValueError, match="pattern='2:4'"):
        sparsegpt_prune(torch.randn(4, 6), torch.eye(6), pattern="2:4")


def test_conv_layer_end_to_end_beats_magnitude_on_the_conv_output():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 8, 3, stride=2, padding=1, padding_mode="reflect", bias=False)
    # Spatially smooth images: neighbouring receptive-field entries are strongly correlated. (On white noise
    # H is about diagonal and OBS reduces to magnitude pruning.)
    images = F.avg_pool2d(torch.randn(8, 6, 24, 24), 5, stride=1)
    stats = capture_all(conv, {"c": conv}, [images], lambda n, m: InputHessian(m))["c"]
    before = conv.weight.detach().clone()
    result = sparsegpt_prune(conv.weight, stats.hessian(), 0.6)
    magnitude = conv.weight.detach() * row_keep_mask(conv.weight.abs(), 0.6)
    dense = conv(images).detach()

    def err(weight):
        return float((conv._conv_forward(images, weight, None) - dense).square().sum())

    assert err(result.weight) < 0.85 * err(magnitude)
    assert torch.equal(conv.weight.detach(), before)  # the layer itself is not modified


def test_grouped_conv_is_independent_per_group():
    torch.manual_seed(0)
    conv = nn.Conv2d(6, 9, 3, padding=1, groups=3, bias=False)
    images = torch.randn(3, 6, 7, 7)
    h = capture_all(conv, {"c": conv}, [images], lambda n, m: InputHessian(m))["c"].hessian()
    assert h.shape == (3, 18, 18)
    batched = sparsegpt_prune(conv.weight, h, 0.5, blocksize=8)
    for g in range(3):
        alone = sparsegpt_prune(conv.weight[3 * g : 3 * g + 3], h[g], 0.5, blocksize=8)
        torch.testing.assert_close(batched.weight[3 * g : 3 * g + 3], alone.weight)
        assert torch.equal(batched.keep[3 * g : 3 * g + 3], alone.keep)
    # The group Hessian is the one of that group's input columns.
    cols = input_columns(conv, images)
    torch.testing.assert_close(h[1], 2 * cols[1].T @ cols[1] / cols.shape[1], rtol=1e-5, atol=1e-5)


def test_dead_inputs_are_pruned_first_and_kept_ones_untouched():
    x = correlated_inputs(16, 100, seed=5)
    x[[2, 9]] = 0.0  # two inputs never active on the calibration set
    w = torch.randn(4, 16, generator=torch.Generator().manual_seed(6))
    result = sparsegpt_prune(w, hessian_of(x), 0.25)
    assert torch.isfinite(result.weight).all()
    assert not result.keep[:, [2, 9]].any()
    # 1 of 16 pruned per row: the dead column 2 (first in storage order) goes, dead column 9 keeps its value.
    result = sparsegpt_prune(w, hessian_of(x), 1 / 16)
    assert not result.keep[:, 2].any() and result.keep[:, 9].all()
    torch.testing.assert_close(result.weight[:, 9], w[:, 9])
    # A layer whose input is all zero: no NaN, the asked sparsity.
    result = sparsegpt_prune(w, torch.zeros(16, 16), 0.5)
    assert torch.isfinite(result.weight).all() and int(result.keep.sum()) == 32


def test_rank_deficient_hessian_raises_the_damping():
    x = correlated_inputs(32, 8)  # 8 rows for 32 columns: rank 8
    w = torch.randn(4, 32)
    result = sparsegpt_prune(w, hessian_of(x), 0.5, percdamp=0.0)
    assert result.damp > 0 and torch.isfinite(result.weight).all()


def test_obs_scores_and_argument_checks():
    x = correlated_inputs(8, 64, dtype=torch.float64)
    h = hessian_of(x)
    w = torch.randn(3, 8, dtype=torch.float64)
    damped = h + 0.01 * h.diagonal().mean() * torch.eye(8, dtype=torch.float64)
    torch.testing.assert_close(obs_scores(w, h), w.square() / torch.linalg.inv(damped).diagonal())
    with pytest.raises(ValueError, match="sparsity"):
        sparsegpt_prune(w, h, 1.0)
    with pytest.raises(ValueError, match="does not fit"):
        sparsegpt_prune(w, torch.eye(7), 0.5)
    with pytest.raises(ValueError, match="keep of shape"):
        sparsegpt_prune(w, h, keep=torch.ones(3, 7, dtype=torch.bool))
