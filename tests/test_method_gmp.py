"""GMP: the cubic schedule, masks that hold between updates, exact final sparsity, resume, option errors."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_prune
from timm_prune.methods.schedules import cubic_sparsity


def _tiny(seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=4)


def _train(pm: timm_prune.PrunableModel, steps: int, total_steps: int, start: int = 0) -> list[float]:
    optimizer = torch.optim.SGD(pm.parameters(), lr=0.05, momentum=0.9)
    generator = torch.Generator().manual_seed(start)
    seen = []
    for step in range(start + 1, start + steps + 1):
        x = torch.randn(4, 3, 32, 32, generator=generator)
        y = torch.randint(0, 4, (4,), generator=generator)
        F.cross_entropy(pm(x), y).backward()
        optimizer.step()
        pm.on_step_end(step=step, total_steps=total_steps)
        optimizer.zero_grad()
        seen.append(_zero_fraction(pm))
    return seen


def _zero_fraction(pm: timm_prune.PrunableModel) -> float:
    zeros = sum(int((m.weight == 0).sum()) for m in pm.targets.values())
    return zeros / sum(m.weight.numel() for m in pm.targets.values())


def test_cubic_schedule_matches_the_formula():
    # s_t = s_f + (s_i - s_f)(1 - progress)^3, over [0.1, 0.5] of 100 steps, from 0.2 to 0.8.
    args = dict(total_steps=100, initial=0.2, final=0.8, start=0.1, end=0.5)
    assert cubic_sparsity(5, **args) == 0.0  # not started
    assert cubic_sparsity(10, **args) == pytest.approx(0.2)
    assert cubic_sparsity(30, **args) == pytest.approx(0.8 - 0.6 * 0.5**3)
    assert cubic_sparsity(50, **args) == pytest.approx(0.8)
    assert cubic_sparsity(90, **args) == pytest.approx(0.8)


@pytest.mark.parametrize("scope", ["layer", "global"])
def test_gmp_reaches_the_target_and_the_zeros_hold(scope):
    pm = timm_prune.convert(_tiny(), timm_prune.PruneConfig(method="gmp", sparsity=0.8, scope=scope, update_every=2))
    seen = _train(pm, steps=20, total_steps=20)
    # Sparsity only grows, and it has reached the target once the schedule ends (75 % of the steps).
    assert all(b >= a - 1e-9 for a, b in zip(seen, seen[1:], strict=False))
    assert seen[len(seen) // 4] < 0.8 - 0.05
    assert seen[-1] == pytest.approx(0.8, abs=2e-3)
    if scope == "layer":
        for module in pm.targets.values():
            assert int((module.weight == 0).sum()) == round(0.8 * module.weight.numel())
    # prune() keeps exactly the zeros GMP trained with.
    zeros_before = {n: (m.weight == 0).clone() for n, m in pm.targets.items()}
    pm.prune()
    for name, keep in pm.masks.items():
        assert torch.equal(~keep, zeros_before[name])


def test_gmp_masks_resume_from_a_state_dict():
    pm = timm_prune.convert(_tiny(), timm_prune.PruneConfig(method="gmp", sparsity=0.6, update_every=1))
    _train(pm, steps=6, total_steps=10)
    resumed = timm_prune.convert(_tiny(seed=1), timm_prune.PruneConfig(method="gmp", sparsity=0.6, update_every=1))
    resumed.load_state_dict(pm.state_dict())
    # Both continue on identical batches: identical weights, so the mask buffers came back with the state.
    _train(pm, steps=4, total_steps=10, start=6)
    _train(resumed, steps=4, total_steps=10, start=6)
    for name, module in pm.targets.items():
        assert torch.equal(module.weight, resumed.targets[name].weight)
    assert _zero_fraction(resumed) == pytest.approx(0.6, abs=2e-3)


def test_gmp_without_step_information_is_a_clear_error():
    pm = timm_prune.convert(_tiny(), timm_prune.PruneConfig(method="gmp", sparsity=0.5))
    with pytest.raises(ValueError, match="on_step_end"):
        pm.on_step_end()


@pytest.mark.parametrize(
    "field, value",
    [("initial_sparsity", 1.0), ("start_fraction", -0.1), ("end_fraction", 2), ("update_every", 0)],
)
def test_gmp_bad_options_name_the_field(field, value):
    with pytest.raises(ValueError, match=field):
        timm_prune.PruneConfig(method="gmp", sparsity=0.5, **{field: value})


def test_gmp_start_after_end_is_rejected():
    with pytest.raises(ValueError, match="start_fraction"):
        timm_prune.PruneConfig(method="gmp", sparsity=0.5, start_fraction=0.8, end_fraction=0.5)
