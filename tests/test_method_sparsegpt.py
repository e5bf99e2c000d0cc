"""SparseGPT through the method API: sequential calibration that prunes and updates weights, then prune()."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn as nn

import timm_prune

# Tiny tensors on 2 shared cores: one intra-op thread is much faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _correlated(n: int, features: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    idx = torch.arange(features, dtype=torch.float32)
    cov = 0.9 ** (idx[:, None] - idx[None]).abs()
    x = torch.randn(n, features, generator=g) @ torch.linalg.cholesky(cov).T
    return x * torch.exp(torch.randn(features, generator=g))


@pytest.mark.parametrize("sparsity", [0.5, 0.7])
def test_layer_output_error_lower_than_magnitude(sparsity):
    torch.manual_seed(0)
    dense = nn.Sequential(nn.Linear(64, 32))
    x = _correlated(512, 64)
    with torch.no_grad():
        reference = dense(x)
    errors = {}
    for method in ("magnitude", "sparsegpt"):
        model = nn.Sequential(nn.Linear(64, 32))
        model.load_state_dict(dense.state_dict())
        config = {"calibration_batches": 4} if method == "sparsegpt" else {}
        pm = timm_prune.convert(model, method=method, sparsity=sparsity, target_modules=["0"], **config)
        if pm.pruner.needs_calibration:
            pm.calibrate(list(x.split(128)))
        report = pm.prune()
        assert report.sparsity == pytest.approx(sparsity, abs=0.005)  # the solve rounds per block of columns
        merged = pm.merge_and_unload()
        with torch.no_grad():
            errors[method] = float((merged(x) - reference).square().sum())
        if method == "sparsegpt":
            # The kept weights moved (the OBS update); merged weights are the updated ones, pruned entries 0.
            kept = pm.masks["0"]
            assert not torch.allclose(merged[0].weight[kept], dense[0].weight[kept])
            assert torch.equal(merged[0].weight == 0, ~kept)
            pm.recover("mean")  # the update leaves zero means: recovery is a no-op, not an error
            torch.testing.assert_close(pm(x), merged(x))
    assert errors["sparsegpt"] < 0.5 * errors["magnitude"], errors


def test_cnn_sequential_calibration_no_hooks_save_load(tmp_path):
    torch.manual_seed(0)
    x = torch.randn(8, 3, 32, 32)
    dense = timm.create_model("test_resnet", num_classes=4).eval()
    pm = timm_prune.convert(copy.deepcopy(dense), method="sparsegpt", sparsity=0.6)
    with pytest.raises(RuntimeError, match="calibrate"):
        pm.prune()
    logs = pm.calibrate([x[:4], x[4:]])
    assert logs["solved_layers"] == len(pm.targets) and logs["passes"] == 1  # one forward over both batches
    # The pass-per-layer mode (less memory) replays the batches up to each layer, and solves the same problem.
    per_layer = timm_prune.convert(dense, method="sparsegpt", sparsity=0.6, one_pass=False)
    per_layer_logs = per_layer.calibrate([x[:4], x[4:]])
    assert per_layer_logs["passes"] >= len(pm.targets)
    assert per_layer_logs["obs_loss"] == pytest.approx(logs["obs_loss"], rel=1e-3)
    assert sum(len(m._forward_pre_hooks) + len(m._forward_hooks) for m in pm.modules()) == 0
    with pytest.raises(RuntimeError, match="already pruned"):
        pm.calibrate([x])
    report = pm.prune()
    assert report.sparsity == pytest.approx(0.6, abs=0.01)
    pm.recover()
    assert pm.recalibrate_batchnorm([x], num_batches=1) == 1
    pm.eval()
    with torch.no_grad():
        expected = pm(x)
    loaded = timm_prune.from_pretrained(pm.save_pretrained(tmp_path / "sg"))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_global_scope_uses_obs_saliency_and_hits_the_total():
    torch.manual_seed(0)
    x = torch.randn(4, 3, 32, 32)
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=4), method="sparsegpt", scope="global")
    pm.calibrate([x])
    report = pm.prune()
    assert report.sparsity == pytest.approx(0.5, abs=0.01)
    assert len({round(layer.sparsity, 2) for layer in report.layers}) > 1


def test_weight_standardised_convs_are_not_solved_but_still_pruned():
    from timm.layers import StdConv2d

    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), StdConv2d(8, 8, 3, padding=1))
    pm = timm_prune.convert(model, method="sparsegpt", target_modules=["0", "2"])
    with pytest.warns(UserWarning, match="transform their weight"):
        logs = pm.calibrate([torch.randn(2, 3, 8, 8)])
    assert logs["solved_layers"] == 1 and "2" not in pm.pruner.solved_masks
    report = pm.prune()
    # 27 and 72 columns per row: round(0.5 * 27) = 14 pruned by the solve's per-row count.
    assert [row.sparsity for row in report.layers] == [pytest.approx(14 / 27), pytest.approx(0.5)]
    assert [row.weight_transformed for row in report.layers] == [False, True]
