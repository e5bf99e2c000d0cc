"""POF with ``hyperspherical=False`` (the penalty and the pruned forwards on the plain weights), and pruned forwards
without the straight-through gradient."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F
from torch.nn.utils import parametrize

import timm_prune

pytestmark = pytest.mark.usefixtures("one_thread")

SPARSITIES = [0.5, 0.8]


def _pm(hyperspherical: bool, pruned_forward: float = 0.0, **options) -> timm_prune.PrunableModel:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    config = timm_prune.PruneConfig(
        method="pof", sparsity=0.8, scope="global", penalty_sparsities=SPARSITIES, pruned_forward=pruned_forward,
        hyperspherical=hyperspherical, **options,
    )  # fmt: skip
    return timm_prune.convert(model, config)


@pytest.mark.parametrize("pruned_forward", [0.0, 0.5])
def test_the_layers_keep_their_plain_weights(pruned_forward):
    # No parametrization even with pruned forwards: those swap the weight for their one forward (dense steps cost
    # nothing extra).
    pm = _pm(hyperspherical=False, pruned_forward=pruned_forward)
    for name, layer in pm.targets.items():
        assert not parametrize.is_parametrized(layer)
        assert pm.pruner.direction(name) is layer.weight


def test_the_penalty_is_the_same_on_plain_weights_and_reaches_them():
    # A unit's candidate energy share does not depend on its scale: same value as on the directions.
    spherical, plain = _pm(hyperspherical=True), _pm(hyperspherical=False)
    expected, value = spherical.penalty(), plain.penalty()
    assert float(value.detach()) > 0
    torch.testing.assert_close(value, expected, rtol=1e-5, atol=0)
    value.backward()
    name = next(iter(plain.targets))
    grad = plain.targets[name].weight.grad
    candidates = plain.pruner.candidate_counts()[name] > 0
    # It drains the candidates: their gradient points along the weight (descent shrinks them).
    assert grad is not None and (grad[candidates] * plain.targets[name].weight[candidates]).sum() > 0


def test_the_penalty_polarises_plain_weights():
    pm = _pm(hyperspherical=False, penalty_weight=1.0).train()
    optimizer = torch.optim.Adam(pm.parameters(), lr=0.02)
    before = pm.candidate_energy()
    for _ in range(30):
        pm.penalty().backward()
        optimizer.step()
        optimizer.zero_grad()
    after = pm.candidate_energy()
    assert all(after[n] < 0.5 * before[n] for n in before), (before, after)


def test_plain_weights_train_prune_save_and_load(tmp_path):
    pm = _pm(hyperspherical=False, pruned_forward=0.5).train()
    x, y = torch.randn(8, 3, 32, 32), torch.randint(0, 4, (8,))
    optimizer = torch.optim.SGD(pm.parameters(), lr=0.05)
    for _ in range(3):
        (F.cross_entropy(pm(x), y) + pm.penalty()).backward()
        optimizer.step()
        optimizer.zero_grad()
    pm.eval()
    with pytest.warns(UserWarning, match="energy"):  # three steps do not polarise
        assert pm.prune().sparsity == pytest.approx(0.8, abs=0.02)
    pm.recover()
    with torch.no_grad():
        expected = pm(x)
    loaded = timm_prune.from_pretrained(pm.save_pretrained(tmp_path / "plain_pof"))
    assert loaded.config.hyperspherical is False
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)


def test_without_straight_through_a_pruned_forward_trains_only_the_kept_weights():
    pm = _pm(hyperspherical=False, pruned_forward=1.0, straight_through=False).train()
    pm.penalty()
    level = pm.pruner.pruned_forward_level()
    pm(torch.randn(6, 3, 32, 32)).square().mean().backward()
    kept_with_gradient = 0
    for name, count in pm.pruner.candidate_counts().items():
        pruned, grad = count >= len(SPARSITIES) - level, pm.pruner.direction(name).grad
        assert torch.count_nonzero(grad[pruned]) == 0
        kept_with_gradient += int(torch.count_nonzero(grad[~pruned]))
    assert kept_with_gradient > 0


@pytest.mark.parametrize("field", ["hyperspherical", "straight_through", "hold_norms"])
def test_a_bad_switch_names_the_field(field):
    with pytest.raises(ValueError, match=field):
        timm_prune.PruneConfig(method="pof", **{field: "no"})
