"""scope="lamp": one global threshold on each layer's LAMP scores (Lee et al., ICLR 2021)."""

from __future__ import annotations

import pytest
import timm
import torch
from torch.nn.utils import parametrize

import timm_prune
from timm_prune.masking import lamp_scores, sorted_lamp_scores


def _lamp_by_definition(weights: torch.Tensor) -> torch.Tensor:
    """w_i^2 / (sum of w_j^2 over the entries with w_j^2 >= w_i^2), entry by entry (distinct values)."""
    squared = weights.double().reshape(-1).square()
    out = torch.stack([squared[i] / squared[squared >= squared[i]].sum() for i in range(squared.numel())])
    return out.reshape(weights.shape).float()


def test_lamp_scores_follow_the_definition():
    torch.testing.assert_close(lamp_scores(torch.tensor([1.0, -3.0, 2.0])), torch.tensor([1 / 14, 1.0, 4 / 13]))
    weights = torch.randn(6, 5, 3)
    torch.testing.assert_close(lamp_scores(weights), _lamp_by_definition(weights))


def test_sorted_lamp_scores_of_each_row_are_those_of_the_row_alone():
    # POF sorts the samples of many layers as the rows of one matrix: no row may see another.
    torch.manual_seed(0)
    rows = torch.randn(4, 50) * torch.tensor([[1.0], [10.0], [0.01], [3.0]])
    magnitude, lamp = sorted_lamp_scores(rows)
    for row, (row_magnitude, row_lamp) in zip(rows, zip(magnitude, lamp, strict=True), strict=True):
        expected = _lamp_by_definition(row)
        order = row.abs().argsort()
        torch.testing.assert_close(row_magnitude, row.abs()[order])
        torch.testing.assert_close(row_lamp, expected[order])


def _pm(scope: str, method: str = "magnitude", sparsity: float = 0.9, **options) -> timm_prune.PrunableModel:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=5)
    return timm_prune.convert(model, timm_prune.PruneConfig(method=method, sparsity=sparsity, scope=scope, **options))


def _shrink(pm: timm_prune.PrunableModel, factor: float) -> str:
    """Scale the first targeted layer's weights by ``factor`` (a POF layer's magnitudes ``g``); its name."""
    name = next(iter(pm.targets))
    module = pm.targets[name]
    with torch.no_grad():
        if parametrize.is_parametrized(module, "weight"):
            module.parametrizations.weight.original0.mul_(factor)
        else:
            module.weight.mul_(factor)
    return name


def test_no_layer_is_emptied_where_one_global_threshold_empties_it():
    results = {}
    for scope in ("global", "lamp"):
        pm = _pm(scope)
        small = _shrink(pm, 1e-3)
        report = pm.prune()
        results[scope] = {layer.name: layer.sparsity for layer in report.layers}
        assert abs(report.sparsity - 0.9) < 1e-3
    assert results["global"][small] == 1.0
    assert max(results["lamp"].values()) < 1.0
    # Not the per-layer answer either: the layers end at different sparsities.
    assert max(results["lamp"].values()) - min(results["lamp"].values()) > 0.1


def test_lamp_masks_do_not_depend_on_a_layers_scale():
    reference, scaled = _pm("lamp"), _pm("lamp")
    _shrink(scaled, 1e-3)
    reference_masks, scaled_masks = reference.pruner.keep_masks(), scaled.pruner.keep_masks()
    assert all(torch.equal(reference_masks[name], scaled_masks[name]) for name in reference_masks)


@pytest.mark.parametrize("method", ["wanda", "sparsegpt", "slr"])
def test_methods_with_their_own_global_ranking_refuse_lamp(method):
    with pytest.raises(ValueError, match=rf"scope 'lamp' is not supported by method '{method}'.*'global'"):
        timm_prune.PruneConfig(method=method, scope="lamp")


def test_pof_selects_its_candidates_on_lamp_scores():
    # Exact thresholds (threshold_sample=0) make the candidates at the top level the masks prune() would build.
    pm = _pm("lamp", method="pof", penalty_sparsities=[0.5, 0.9], threshold_sample=0, penalty_weight=1.0)
    small = _shrink(pm, 1e-3)
    pm.train()
    pm.penalty()  # the first training call selects the candidates
    masks = pm.pruner.keep_masks(0.9)
    assert pm.pruner.weight(small).abs().max() < 1e-2  # the shrink took
    # An entry lies in as many nested candidate sets as levels prune it: both (2) for the 50 % set, one for 90 %.
    for name, levels in pm.pruner.candidate_counts().items():
        assert torch.equal(levels >= 1, ~masks[name]), name
        assert torch.equal(levels >= 2, ~pm.pruner.keep_masks(0.5)[name]), name
    assert bool(masks[small].any())
    # The default path: thresholds from a sample, one sort per layer, cutoffs on |w| from a table. Its sets are
    # nearly the exact ones, level by level.
    sampled = _pm("lamp", method="pof", penalty_sparsities=[0.5, 0.9], penalty_weight=1.0, threshold_sample=4096)
    _shrink(sampled, 1e-3)
    sampled.train()
    sampled.penalty()
    counts = sampled.pruner.candidate_counts()
    total = sum(c.numel() for c in counts.values())
    for level, sparsity in ((1, 0.9), (2, 0.5)):
        exact = sampled.pruner.keep_masks(sparsity)
        assert abs(sum(int((c >= level).sum()) for c in counts.values()) / total - sparsity) < 0.03
        agree = sum(int(((counts[n] >= level) == ~exact[n]).sum()) for n in counts) / total
        assert agree > 0.99, (sparsity, agree)  # one global threshold on |w| agrees 0.96 with exact LAMP here
    assert not bool((counts[small] >= 1).all())


def test_gmp_reaches_its_sparsity_on_lamp_scores():
    pm = _pm("lamp", method="gmp", sparsity=0.8, update_every=1)
    small = _shrink(pm, 1e-3)
    pm.on_step_end(step=100, total_steps=100)
    report = pm.prune()
    assert abs(report.sparsity - 0.8) < 1e-3
    assert {layer.name: layer.sparsity for layer in report.layers}[small] < 1.0


@pytest.mark.parametrize("threshold_sample", [65536, 10**7])  # thresholds from a draw / from every entry
def test_pof_estimates_large_layers_lamp_scores_from_a_sample(threshold_sample):
    # lamp_sample=512: every layer of test_resnet but one is larger, so nearly every score is an estimate.
    pm = _pm(
        "lamp",
        method="pof",
        penalty_sparsities=[0.5, 0.9],
        penalty_weight=1.0,
        lamp_sample=512,
        threshold_sample=threshold_sample,
    )
    assert sum(layer.weight.numel() > 512 for layer in pm.targets.values()) >= 10
    _shrink(pm, 1e-3)
    pm.train()
    pm.penalty()
    counts = {name: c.clone() for name, c in pm.pruner.candidate_counts().items()}
    total = sum(c.numel() for c in counts.values())
    for level, sparsity in ((1, 0.9), (2, 0.5)):
        exact = pm.pruner.keep_masks(sparsity)
        assert abs(sum(int((c >= level).sum()) for c in counts.values()) / total - sparsity) < 0.03
        agree = sum(int(((counts[n] >= level) == ~exact[n]).sum()) for n in counts) / total
        assert agree > 0.97, (sparsity, agree)
    # Seeded by the step: a second selection at the same step (another DDP rank, a resumed run) draws alike.
    pm.pruner.step.sub_(1)  # the training call selected at step 0, then counted itself
    pm.pruner.select_candidates()
    assert all(torch.equal(counts[n], c) for n, c in pm.pruner.candidate_counts().items())


def test_pof_lamp_sample_zero_is_exact_per_layer():
    exact = _pm("lamp", method="pof", penalty_sparsities=[0.9], lamp_sample=0, threshold_sample=4096)
    sampled = _pm("lamp", method="pof", penalty_sparsities=[0.9], lamp_sample=64, threshold_sample=4096)
    exact.pruner.select_candidates()
    sampled.pruner.select_candidates()
    # Same global draw (same step), so the sets differ only through the per-layer estimates.
    differ = sum(
        int((exact.pruner.candidate_counts()[n] != c).sum()) for n, c in sampled.pruner.candidate_counts().items()
    )
    assert differ > 0


@pytest.mark.parametrize("value", [-1, 1.5, "4096", True])
def test_pof_lamp_sample_must_be_a_count(value):
    with pytest.raises(ValueError, match="PruneConfig.lamp_sample must be an integer >= 0"):
        timm_prune.PruneConfig(method="pof", lamp_sample=value)


@pytest.mark.parametrize(
    ("method", "options", "scope"),
    [
        ("pof", {}, "lamp"),
        ("magnitude", {}, "lamp"),
        ("gmp", {}, "layer"),
        ("wanda", {}, "layer"),
        ("sparsegpt", {}, "layer"),
        ("pof", {"pattern": "2:4"}, "layer"),
        ("pof", {"scope": "global"}, "global"),
        ("magnitude", {"scope": "layer"}, "layer"),
    ],
)
def test_default_scope_is_the_methods(method, options, scope):
    config = timm_prune.PruneConfig(method=method, **options)
    assert config.scope == scope
    # Saved explicitly: a config read back prunes as it did, whatever later defaults become.
    assert timm_prune.PruneConfig.from_dict(config.to_dict()).scope == scope
    assert config.to_dict()["scope"] == scope
