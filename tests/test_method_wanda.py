"""Wanda through the method API: calibrate on images, prune per output row by |W| * ||X_j||, no hooks left."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn as nn

import timm_prune

# Tiny tensors on 2 shared cores: one intra-op thread is much faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _hooks(model: nn.Module) -> int:
    return sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in model.modules())


def test_wanda_masks_equal_the_hand_computed_scores_per_output_row():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3))
    x = torch.randn(10, 8) * torch.linspace(0.1, 3.0, 8)  # features of very different scales
    w = model[0].weight.detach().clone()
    pm = timm_prune.convert(model, method="wanda", sparsity=0.5, target_modules=["0"], calibration_batches=2)
    hooks_before = _hooks(pm)
    pm.calibrate([x[:4], (x[4:], torch.zeros(6))])
    assert _hooks(pm) == hooks_before
    pm.prune()
    # By hand: ||X_j||_2 over the 10 rows, score |W_ij| * ||X_j||, the 4 lowest of each row of 8 pruned.
    norms = torch.sqrt((x**2).sum(0))
    scores = w.abs() * norms
    expected = torch.ones_like(w, dtype=torch.bool)
    for i in range(w.shape[0]):
        expected[i, scores[i].argsort()[:4]] = False
    assert torch.equal(pm.masks["0"], expected)
    torch.testing.assert_close(pm.model[0].weight, w * expected)
    # Activations matter: magnitude alone ranks differently here.
    magnitude = timm_prune.convert(
        nn.Sequential(nn.Linear(8, 6), nn.ReLU(), nn.Linear(6, 3)), method="magnitude", target_modules=["0"]
    )
    magnitude.model[0].weight.data.copy_(w)
    magnitude.prune()
    assert not torch.equal(magnitude.masks["0"], expected)


def test_wanda_global_scope_and_calibration_errors():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=4), method="wanda", scope="global")
    assert pm.candidate_energy() == {}  # no scores before calibration
    with pytest.raises(RuntimeError, match="calibrate"):
        pm.prune()
    with pytest.raises(ValueError, match="yielded nothing"):
        pm.calibrate([])
    logs = pm.calibrate(iter([x] * 100))  # an endless-looking iterable: only calibration_batches are read
    assert logs["calibration_batches"] == 8 and logs["calibration_images"] == 32
    report = pm.prune()
    assert report.sparsity == pytest.approx(0.5, abs=1e-3)
    assert len({round(layer.sparsity, 2) for layer in report.layers}) > 1  # one threshold, uneven layers
    with pytest.raises(ValueError, match=r"PruneConfig\.calibration_batches"):
        timm_prune.PruneConfig(method="wanda", calibration_batches=0)
