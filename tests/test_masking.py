"""Exact thresholds (per layer and global, with ties), recovery statistics, and the report."""

from __future__ import annotations

import pytest
import torch

from timm_prune import masking


@pytest.mark.parametrize("k", [1, 7, 500, 2999, 3000])
def test_kth_smallest_matches_sort_across_chunks(monkeypatch, k):
    monkeypatch.setattr(masking, "_CHUNK", 256)  # force several chunks per layer
    layers = [torch.rand(1000), torch.rand(37, 11) * 5, torch.zeros(593), torch.rand(1000).round(decimals=1)]
    values = torch.cat([t.flatten() for t in layers])
    expected = values.sort().values[k - 1].item()
    assert masking.kth_smallest([lambda t=t: t for t in layers], k) == expected


def test_kth_smallest_rejects_out_of_range():
    with pytest.raises(ValueError, match="k >= 1"):
        masking.kth_smallest([lambda: torch.rand(4)], 0)
    with pytest.raises(ValueError, match="element 9 of 4"):
        masking.kth_smallest([lambda: torch.rand(4)], 9)


@pytest.mark.parametrize("sparsity", [0.0, 0.3, 0.5, 0.9, 0.99])
def test_global_masks_prune_exact_count_with_ties(sparsity):
    # Many exact ties (zeros and repeated values) straddle the threshold.
    layers = [torch.zeros(100), torch.arange(200.0) % 7, torch.rand(30, 10)]
    masks = masking.global_keep_masks([lambda t=t: t for t in layers], sparsity)
    total = sum(t.numel() for t in layers)
    pruned = sum(int((~m).sum()) for m in masks)
    assert pruned == round(sparsity * total)
    # Everything pruned is <= everything kept.
    pruned_max = max((t[~m].max().item() for t, m in zip(layers, masks, strict=True) if (~m).any()), default=-1)
    kept_min = min((t[m].min().item() for t, m in zip(layers, masks, strict=True) if m.any()), default=1e9)
    assert pruned_max <= kept_min


@pytest.mark.parametrize("sparsity", [0.0, 0.25, 0.7, 0.95])
def test_layer_mask_exact_count_and_order(sparsity):
    scores = torch.cat([torch.zeros(50), torch.rand(950)]).reshape(20, 50)
    keep = masking.layer_keep_mask(scores, sparsity)
    assert int((~keep).sum()) == round(sparsity * scores.numel())
    if 0 < sparsity:
        assert scores[~keep].max() <= scores[keep].min()


def test_recovery_statistics_by_hand():
    w = torch.tensor([[1.0, -2.0, 3.0, 4.0], [0.5, 0.5, -1.0, 2.0]])
    keep = torch.tensor([[True, False, True, False], [True, True, True, True]])
    mean, scale = masking.recovery_statistics(w, keep, "mean")
    assert mean.tolist() == [1.0, 0.0] and scale.tolist() == [1.0, 1.0]  # (-2 + 4) / 2; nothing pruned in unit 1
    mean, _ = masking.recovery_statistics(w, keep, "layer_mean")
    assert mean.tolist() == [1.0, 1.0]
    mean, scale = masking.recovery_statistics(w, keep, "renorm")
    assert mean.tolist() == [0.0, 0.0]
    assert scale[0].item() == pytest.approx((30.0 / 10.0) ** 0.5) and scale[1].item() == pytest.approx(1.0)
    with pytest.raises(ValueError, match="unknown recovery"):
        masking.recovery_statistics(w, keep, "median")


def test_report_sums_layers():
    report = masking.PruneReport("pof", "layer", 0.5)
    report.layers.append(masking.LayerReport("a", "Conv2d", [2, 2], 4, 0.5))
    report.layers.append(masking.LayerReport("b", "Linear", [4, 4], 16, 0.75))
    assert report.numel == 20 and report.sparsity == pytest.approx(14 / 20)
    data = report.to_dict()
    assert data["layers"][1]["name"] == "b" and data["sparsity"] == pytest.approx(0.7)
    assert "70.00% of 20 targeted weights" in str(report)
