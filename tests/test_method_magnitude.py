"""Magnitude: the plain baseline (no re-parametrisation, no penalty; prune() zeroes the smallest |w|)."""

from __future__ import annotations

import timm
import torch
from torch.nn.utils import parametrize

import timm_prune


def test_magnitude_method_trains_plainly_and_prunes_the_smallest_weights():
    model = timm.create_model("test_resnet", num_classes=4)
    x = torch.randn(2, 3, 32, 32)
    expected = model(x)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(method="magnitude", sparsity=0.6, scope="layer"))
    assert not any(parametrize.is_parametrized(m) for m in pm.targets.values())
    assert pm.config.penalty_weight == 0.0 and pm.penalty().item() == 0.0
    torch.testing.assert_close(pm(x), expected)
    before = {n: m.weight.detach().clone() for n, m in pm.targets.items()}
    pm.prune()
    for name, module in pm.targets.items():
        w = before[name].flatten()
        k = round(0.6 * w.numel())
        pruned = torch.zeros_like(w, dtype=torch.bool)
        pruned[w.abs().argsort()[:k]] = True
        assert torch.equal(module.weight.detach().flatten() == 0, pruned), name
        torch.testing.assert_close(module.weight.detach().flatten()[~pruned], w[~pruned])
