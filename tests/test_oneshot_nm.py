"""N:M keep masks (timm_prune.oneshot.nm): exactly N kept in every group of M input channels."""

from __future__ import annotations

import pytest
import torch

from timm_prune.oneshot.nm import NMPattern, is_nm, nm_compatible, nm_keep_mask, parse_pattern


@pytest.mark.parametrize(
    ("text", "expected"),
    [("2:4", NMPattern(2, 4)), (" 1 : 8 ", NMPattern(1, 8)), ((4, 8), NMPattern(4, 8)), (None, None)],
)
def test_parse_pattern_accepts(text, expected):
    assert parse_pattern(text) == expected
    if expected is not None:
        assert str(parse_pattern(text)) == f"{expected.n}:{expected.m}"
        assert parse_pattern(expected) == expected


@pytest.mark.parametrize("bad", ["2/4", "4:2", "0:4", "2:2", "a:b", "2:4:8", "", "-1:4", 2.5, (2,), (True, 4), "2.0:4"])
def test_parse_pattern_rejects_naming_the_field(bad):
    with pytest.raises(ValueError, match=r"pattern=.*'N:M'"):
        parse_pattern(bad)


def _reference_nm(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Loop reference: along dim 1, groups of m at every other index fixed; the n largest of each kept."""
    keep = torch.zeros(scores.shape, dtype=torch.bool)
    moved = scores.movedim(1, -1)
    kept = keep.movedim(1, -1)  # a view: writes land in keep
    for index in torch.cartesian_prod(*[torch.arange(s) for s in moved.shape[:-1]]).reshape(-1, moved.dim() - 1):
        line = moved[tuple(index.tolist())]
        for start in range(0, line.numel(), m):
            top = torch.topk(line[start : start + m], n).indices + start
            kept[tuple(index.tolist())][top] = True
    return keep


@pytest.mark.parametrize(
    ("shape", "pattern"),
    [
        ((8, 16), "2:4"),
        ((5, 32), "1:4"),
        ((6, 24), "3:4"),
        ((4, 16), "2:8"),
        ((8, 8, 3, 3), "2:4"),
        ((6, 16, 1, 1), "2:4"),
        ((4, 12, 2, 3), "1:3"),
    ],
)
def test_nm_mask_exactly_n_in_every_group_lowest_pruned(shape, pattern):
    torch.manual_seed(0)
    scores = torch.rand(shape)  # distinct almost surely
    keep = nm_keep_mask(scores, pattern)
    p = parse_pattern(pattern)
    assert keep.shape == scores.shape and keep.dtype == torch.bool
    assert is_nm(keep, pattern)
    assert int(keep.sum()) == scores.numel() * p.n // p.m
    assert torch.equal(keep, _reference_nm(scores, p.n, p.m))


def test_conv_groups_run_along_input_channels_at_each_kernel_position():
    # One output channel, 4 input channels, 1x2 kernel: position (0, 0) and (0, 1) each form their own group of 4.
    scores = torch.tensor([[[[1.0, 8.0]], [[2.0, 7.0]], [[3.0, 6.0]], [[4.0, 5.0]]]])
    keep = nm_keep_mask(scores, "2:4")
    assert keep[0, :, 0, 0].tolist() == [False, False, True, True]
    assert keep[0, :, 0, 1].tolist() == [True, True, False, False]
    # A 1x1 conv is a linear layer.
    w = torch.rand(6, 8)
    assert torch.equal(nm_keep_mask(w[:, :, None, None], "2:4")[:, :, 0, 0], nm_keep_mask(w, "2:4"))


def test_ties_still_give_exactly_n():
    keep = nm_keep_mask(torch.zeros(3, 8), "2:4")
    assert is_nm(keep, "2:4")
    # Ties: the earlier entries of a group are pruned first.
    assert keep[0].tolist() == [False, False, True, True] * 2


def test_indivisible_input_dimension_is_rejected():
    for shape in [(4, 6), (4, 1, 3, 3), (8, 10, 3, 3)]:
        assert not nm_compatible(shape, "2:4")
        with pytest.raises(ValueError, match=r"pattern='2:4'.*not a multiple of M=4"):
            nm_keep_mask(torch.rand(shape), "2:4")
    assert nm_compatible((4, 8, 3, 3), "2:4") and nm_compatible(torch.Size([3, 16]), (1, 4))
    assert not is_nm(torch.ones(4, 6, dtype=torch.bool), "2:4")


def test_is_nm_detects_violations():
    keep = nm_keep_mask(torch.rand(4, 16), "2:4")
    assert is_nm(keep, "2:4") and not is_nm(keep, "1:4")
    keep[1, 3] = ~keep[1, 3]
    assert not is_nm(keep, "2:4")
