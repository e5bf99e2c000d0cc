"""N:M patterns (``PruneConfig.pattern``) on every registered unstructured method: exactly N kept in every group of
M input channels after ``prune()``; POF's candidate sets and SLR's projections follow the same pattern."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_prune
from timm_prune.methods import get_method
from timm_prune.oneshot.nm import is_nm

UNSTRUCTURED = [name for name in timm_prune.list_methods() if not get_method(name).structured]


# Tiny tensors on 2 shared cores: one intra-op thread is much faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize("pattern", ["2:4", "1:4"])
@pytest.mark.parametrize("name", UNSTRUCTURED)
def test_every_unstructured_method_prunes_in_the_pattern(name: str, pattern: str) -> None:
    torch.manual_seed(0)
    n, m = map(int, pattern.split(":"))
    # Every layer test_resnet targets (stem conv and classifier excluded) has a multiple of 4 input channels.
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=4), method=name, pattern=pattern)
    assert pm.config.sparsity == pytest.approx(1 - n / m) and pm.config.pattern == pattern
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 4, (4,))
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.01)
    for step in (1, 2):
        (F.cross_entropy(pm(x), y) + pm.penalty()).backward()
        optimizer.step()
        pm.on_step_end(step=step, total_steps=2)
        optimizer.zero_grad()
    pm.on_epoch_end(train_loss=1.0)
    if name == "pof":  # candidate sets: the pruned-to-be entries of an N:M mask
        for candidates in pm.pruner._candidates.values():
            assert is_nm(candidates == 0, pattern)
    if name == "slr":  # Z, the projection of W + U, lies in the pattern
        for layer in pm.pruner.layers:
            assert is_nm(pm.pruner.state_of(layer).z != 0, pattern)
    if pm.pruner.needs_calibration:
        pm.calibrate([x])
    pm.eval()
    report = pm.prune()
    assert pm.pruner.pattern_skipped == []
    for layer, keep in pm.masks.items():
        assert is_nm(keep, pattern), layer
        assert is_nm(pm.targets[layer].weight != 0, pattern) or name == "sparsegpt", layer
    assert report.sparsity == pytest.approx(1 - n / m, abs=0.01)
    pm.recover()
    merged = pm.merge_and_unload()
    for layer, keep in pm.masks.items():
        assert torch.equal(merged.get_submodule(layer).weight[~keep], torch.zeros(int((~keep).sum())))


def test_layers_the_pattern_cannot_hold_stay_dense_with_a_warning() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 4))
    pm = timm_prune.convert(model, method="magnitude", pattern="2:4", target_modules=["0", "2"])
    with pytest.warns(UserWarning, match="not a multiple of 4"):
        report = pm.prune()
    assert pm.pruner.pattern_skipped == ["0"]
    assert [row.sparsity for row in report.layers] == [0.0, 0.5]


def test_pattern_config_rules() -> None:
    assert timm_prune.PruneConfig(method="wanda", pattern=" 2 : 4 ").pattern == "2:4"
    assert timm_prune.PruneConfig(method="magnitude", pattern="2:4", sparsity=0.5).sparsity == 0.5
    with pytest.raises(ValueError, match=r"PruneConfig\.sparsity must be 1 - N/M = 0\.5"):
        timm_prune.PruneConfig(method="magnitude", pattern="2:4", sparsity=0.7)
    with pytest.raises(ValueError, match=r"PruneConfig\.scope must be 'layer'"):
        timm_prune.PruneConfig(method="magnitude", pattern="2:4", scope="global")
    with pytest.raises(ValueError, match=r"PruneConfig\.pattern='2/4' is invalid"):
        timm_prune.PruneConfig(method="magnitude", pattern="2/4")
    config = timm_prune.PruneConfig(method="sparsegpt", pattern="1:4")
    assert timm_prune.PruneConfig.from_json(config.to_json()) == config
    # Structured methods have no use for it: stored as None, left out of the saved config.
    autobot = timm_prune.PruneConfig(method="autobot", pattern="2:4")
    assert autobot.pattern is None and "pattern" not in autobot.to_dict()
