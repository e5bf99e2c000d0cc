"""Wanda scores and masks (timm_prune.oneshot.wanda) against hand-computed values."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn as nn

from timm_prune.oneshot.capture import capture_all
from timm_prune.oneshot.nm import is_nm
from timm_prune.oneshot.wanda import row_keep_mask, wanda_keep_mask, wanda_scores


def test_linear_score_equals_hand_computation():
    layer = nn.Linear(4, 2, bias=True)
    with torch.no_grad():
        layer.weight.copy_(torch.tensor([[1.0, -2.0, 3.0, -4.0], [0.5, 0.0, -1.0, 2.0]]))
    # Two batches of rows (the second 3-D, as a ViT token input): four input rows in all.
    x1 = torch.tensor([[1.0, 0.0, 2.0, 0.0], [3.0, 0.0, 0.0, 4.0]])
    x2 = torch.tensor([[[0.0, 0.0, 0.0, 0.0], [1.0, 0.0, 0.0, 0.0]]])
    stats = capture_all(nn.Sequential(layer), {"0": layer}, [x1, x2])["0"]
    assert stats.rows == 4
    # ||X_j||^2 = [1 + 9 + 0 + 1, 0, 4, 16] = [11, 0, 4, 16]; RMS over the 4 rows.
    rms = [math.sqrt(11 / 4), 0.0, math.sqrt(4 / 4), math.sqrt(16 / 4)]
    expected = torch.tensor(
        [[1 * rms[0], 2 * rms[1], 3 * rms[2], 4 * rms[3]], [0.5 * rms[0], 0.0, 1 * rms[2], 2 * rms[3]]]
    )
    scores = wanda_scores(layer.weight, stats.norms())
    torch.testing.assert_close(scores, expected)
    # Per row at 50 %: row 0 keeps 4 * 2 = 8 and 3 * 1 = 3 (drops 1.66 and 0); row 1 keeps 4 and 1, drops 0.83 and 0.
    keep = wanda_keep_mask(layer.weight, stats.norms(), 0.5)
    assert keep.tolist() == [[False, False, True, True], [False, False, True, True]]


def test_conv_score_equals_hand_computation():
    conv = nn.Conv2d(1, 1, kernel_size=2, bias=False)
    with torch.no_grad():
        conv.weight.copy_(torch.tensor([[[[1.0, -1.0], [2.0, 0.5]]]]))
    x = torch.arange(9.0).reshape(1, 1, 3, 3)  # [[0 1 2] [3 4 5] [6 7 8]]
    # 2x2 patches (row-major positions): [0 1 3 4], [1 2 4 5], [3 4 6 7], [4 5 7 8]. Per kernel entry:
    # (0,0): 0,1,3,4 -> 26   (0,1): 1,2,4,5 -> 46   (1,0): 3,4,6,7 -> 110   (1,1): 4,5,7,8 -> 154
    stats = capture_all(conv, {"c": conv}, [x])["c"]
    assert stats.rows == 4
    norms = torch.tensor([26.0, 46.0, 110.0, 154.0]).div(4).sqrt()
    torch.testing.assert_close(stats.norms(), norms[None])
    expected = torch.tensor([[[[1 * norms[0], 1 * norms[1]], [2 * norms[2], 0.5 * norms[3]]]]])
    torch.testing.assert_close(wanda_scores(conv.weight, stats.norms()), expected)


def test_grouped_conv_rows_read_their_own_group():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, kernel_size=3, padding=1, groups=2, bias=False)
    x = torch.randn(2, 4, 5, 5)
    x[:, :2] *= 10  # group 0's inputs much larger
    norms = capture_all(conv, {"c": conv}, [x])["c"].norms()
    assert norms.shape == (2, 2 * 9)
    scores = wanda_scores(conv.weight, norms)
    for out in range(6):
        group = out // 3
        torch.testing.assert_close(scores[out].reshape(-1), conv.weight[out].abs().reshape(-1) * norms[group])


def test_row_mask_prunes_lowest_per_row_exactly():
    torch.manual_seed(0)
    weight = torch.randn(8, 3, 3, 3)
    norms = torch.rand(1, 27) + 0.1
    for sparsity in (0.0, 0.3, 0.5, 0.9):
        keep = wanda_keep_mask(weight, norms, sparsity)
        flat_keep = keep.reshape(8, -1)
        pruned = round(sparsity * 27)
        assert (flat_keep.sum(1) == 27 - pruned).all()
        scores = wanda_scores(weight, norms).reshape(8, -1)
        if 0 < pruned < 27:
            highest_pruned = scores.masked_fill(flat_keep, -1).max(1).values
            lowest_kept = scores.masked_fill(~flat_keep, math.inf).min(1).values
            assert (highest_pruned <= lowest_kept).all()
    with pytest.raises(ValueError, match="sparsity"):
        row_keep_mask(weight, 1.0)


def test_activations_change_the_ranking():
    # Small weights on a loud input beat larger weights on quiet inputs: magnitude would do the opposite.
    weight = torch.tensor([[0.1, 1.0, 1.0, 0.9]])
    norms = torch.tensor([[100.0, 1.0, 1.0, 1.0]])
    assert wanda_keep_mask(weight, norms, 0.25).tolist() == [[True, True, True, False]]
    assert row_keep_mask(weight.abs(), 0.25).tolist() == [[False, True, True, True]]


def test_nm_pattern():
    torch.manual_seed(0)
    for shape, cols in [((8, 16), 16), ((4, 8, 3, 3), 72)]:
        weight = torch.randn(shape)
        keep = wanda_keep_mask(weight, torch.rand(1, cols), pattern="2:4")
        assert is_nm(keep, "2:4")
    with pytest.raises(ValueError, match="pattern"):
        wanda_keep_mask(torch.randn(4, 6), torch.rand(1, 6), pattern="2:4")


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="do not fit"):
        wanda_scores(torch.randn(4, 8), torch.rand(1, 7))
