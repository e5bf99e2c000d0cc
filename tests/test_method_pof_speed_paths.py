"""POF's fast paths against their plain definitions: fused weight norm, the hand-written penalty gradient,
sampled thresholds and nested candidate sets; and the magnitude baseline method."""

from __future__ import annotations

import pytest
import torch
import torch.nn as nn

import timm_prune
from timm_prune.methods import pof_penalty
from timm_prune.methods.pof_penalty import StackedCandidateEnergy


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 16, 3), nn.ReLU(), nn.Conv2d(16, 4, 1))


def test_hyperspherical_weight_equals_g_times_unit_direction_and_survives_a_zero_unit():
    model = _conv_model()
    pm = timm_prune.convert(model, timm_prune.PruneConfig(sparsity=0.5, target_modules=["0", "2"]))
    layer = pm.targets["2"]
    g, v = layer.parametrizations.weight.original0, layer.parametrizations.weight.original1
    expected = g.view(-1, 1, 1, 1) * v / v.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
    torch.testing.assert_close(layer.weight, expected, rtol=1e-6, atol=0)
    with torch.no_grad():
        new = layer.weight.clone()
        new[3] = 0  # a unit pruned whole
        layer.weight = new
    assert torch.isfinite(layer.weight).all() and layer.weight[3].abs().sum() == 0
    torch.testing.assert_close(layer.weight, new)


@pytest.mark.parametrize("pruned_forward", [0.0, 1.0])
def test_channels_last_weights_keep_the_strides_a_plain_layer_has(pruned_forward):
    # A depthwise kernel (C_in = 1) is "contiguous" in both formats, yet the convolution picks its kernel by the
    # exact strides: with the fused weight norm's contiguous ones, ConvNeXt's POF steps ran 1.2x plain in bf16.
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 7, padding=3, groups=8), nn.Conv2d(8, 4, 1))
    plain = nn.Sequential(
        *[
            nn.Conv2d(c.in_channels, c.out_channels, c.kernel_size, groups=c.groups)
            for c in (model[0], model[2], model[3])
        ]
    ).to(memory_format=torch.channels_last)
    config = timm_prune.PruneConfig(sparsity=0.5, penalty_sparsities=[0.5, 0.9], pruned_forward=pruned_forward)
    pm = timm_prune.convert(model, config).to(memory_format=torch.channels_last)
    x = torch.randn(2, 3, 12, 12).contiguous(memory_format=torch.channels_last)
    pm.train()
    pm(x).sum().backward()  # candidates selected; the next training forward may run pruned
    pm.penalty()
    for name, reference in zip(["0", "2", "3"], plain, strict=True):
        assert pm.targets[name].weight.stride() == reference.weight.stride(), name
    pm(x).square().sum().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in pm.parameters() if p.requires_grad)


def _energy_shares(v: torch.Tensor, counts: torch.Tensor) -> torch.Tensor:
    """The definition: per unit, the candidates' share of the unit's energy (autograd differentiates it)."""
    v2 = v.reshape(v.shape[0], -1).square()
    return (v2 * counts.reshape(v.shape[0], -1)).sum(1) / v2.sum(1)


def test_stacked_candidate_energy_matches_autograd_of_the_definition():
    # Three layers of one fan-in (12), different numbers of units and shapes, stacked row-wise.
    torch.manual_seed(0)
    shapes = [(5, 12), (3, 3, 2, 2), (7, 12)]
    directions = [torch.randn(s, dtype=torch.float64, requires_grad=True) for s in shapes]
    counts = [torch.randint(0, 3, s, dtype=torch.uint8) for s in shapes]
    stacked = torch.cat([c.reshape(c.shape[0], -1) for c in counts])
    unit_weights = torch.cat([torch.full((s[0],), 1.0 / s[0], dtype=torch.float64) for s in shapes])

    def stacked_energy(*vs):
        return StackedCandidateEnergy.apply(unit_weights, stacked, *vs)

    assert torch.autograd.gradcheck(stacked_energy, tuple(directions))
    reference = sum(_energy_shares(v, c).mean() for v, c in zip(directions, counts, strict=True))
    torch.testing.assert_close(stacked_energy(*directions), reference)


def _mixed_fan_in_model() -> nn.Module:
    # Fan-ins 12, 16, 16, 27 (3 x 3 x 3), 16: two layers share a stack, the others stand alone.
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Linear(12, 16),
        nn.Linear(16, 16),
        nn.Linear(16, 27),
        nn.Unflatten(1, (3, 3, 3)),
        nn.Conv2d(3, 16, 3),
        nn.Flatten(),
        nn.Linear(16, 4),
    )


@pytest.mark.parametrize("hyperspherical", [True, False])
@pytest.mark.parametrize("cpu_stack_entries", [None, 300])
def test_penalty_and_its_gradients_equal_the_per_layer_definition(hyperspherical, cpu_stack_entries, monkeypatch):
    if cpu_stack_entries is not None:  # layers 1 and 2 (256 entries each) then no longer fit one stack
        monkeypatch.setattr(pof_penalty, "CPU_STACK_ENTRIES", cpu_stack_entries)
    config = timm_prune.PruneConfig(
        sparsity=0.5,
        penalty_sparsities=[0.3, 0.6],
        penalty_weight=2.0,
        hyperspherical=hyperspherical,
        target_modules=["0", "1", "2", "4", "6"],
    )
    pm = timm_prune.convert(_mixed_fan_in_model(), config)
    penalty = pm.penalty()
    penalty.backward()
    names = list(pm.targets)
    # Fan-ins 12, 16 (layers 1, 2, 6: 256 + 432 + 64 entries), 27; a bound of 300 cuts the 16s into three.
    expected = [["0"], ["1", "2", "6"], ["4"]] if cpu_stack_entries is None else [["0"], ["1"], ["2"], ["4"], ["6"]]
    assert sorted(pm.pruner.penalty_stacks()) == expected
    directions = {n: pm.pruner.direction(n) for n in names}
    grads = {n: d.grad.clone() for n, d in directions.items()}
    leaves = {n: d.detach().clone().requires_grad_(True) for n, d in directions.items()}
    counts = pm.pruner.candidate_counts()
    reference = 2.0 / 2 * torch.stack([_energy_shares(leaves[n], counts[n]).mean() for n in names]).mean()
    reference.backward()
    torch.testing.assert_close(penalty, reference, rtol=1e-6, atol=0)
    for name in names:
        torch.testing.assert_close(grads[name], leaves[name].grad, rtol=1e-5, atol=1e-9)


def test_penalty_follows_every_write_to_the_candidate_buffers():
    """The stacked candidates are a cache: a refresh, an in-place write or a loaded state must reach the penalty."""
    config = dict(sparsity=0.5, target_modules=["0", "1", "2", "4", "6"], threshold_refresh=1000)
    pm = timm_prune.convert(_mixed_fan_in_model(), timm_prune.PruneConfig(**config))
    other = timm_prune.convert(
        _mixed_fan_in_model(),
        timm_prune.PruneConfig(sparsity=0.8, **{k: v for k, v in config.items() if k != "sparsity"}),
    )
    first = pm.penalty().item()
    other.penalty()  # selects its (larger) candidate sets

    def by_hand() -> float:
        counts = pm.pruner.candidate_counts()
        shares = [_energy_shares(pm.pruner.direction(n).detach(), c).mean() for n, c in counts.items()]
        return pm.pruner.config.penalty_weight * torch.stack(shares).mean().item()

    assert first == pytest.approx(by_hand(), rel=1e-6)
    pm.pruner.candidate_counts()["1"].zero_()  # in place: layer 1 (stacked with layer 2) has no candidates now
    emptied = pm.penalty().item()
    assert emptied == pytest.approx(by_hand(), rel=1e-6) and emptied < first
    pm.load_state_dict(other.state_dict())  # the other model's weights and 80 % candidate sets
    loaded = pm.penalty().item()
    assert loaded == pytest.approx(by_hand(), rel=1e-6) and loaded > first


def test_nested_candidate_sets_count_membership_and_average_the_energies():
    model = _conv_model()
    sparsities = [0.3, 0.6, 0.9]
    config = timm_prune.PruneConfig(
        sparsity=0.6, scope="layer", penalty_sparsities=sparsities, threshold_sample=0, penalty_weight=2.0
    )
    pm = timm_prune.convert(model, config)
    value = pm.penalty()
    energies = []
    for index, (name, layer) in enumerate(pm.targets.items()):
        u = layer.parametrizations.weight.original1.detach()
        u = u / u.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        order = u.abs().flatten().argsort()
        count = torch.zeros(u.numel())
        per_set = []
        for p in sparsities:
            member = torch.zeros(u.numel(), dtype=torch.bool)
            member[order[: round(p * u.numel())]] = True
            count += member
            per_set.append((u.square().flatten() * member).view(u.shape[0], -1).sum(1).mean())
        assert torch.equal(getattr(pm.pruner, f"candidates_{index}").flatten().float(), count), name
        energies.append(torch.stack(per_set).mean())
    assert value.item() == pytest.approx(2.0 * torch.stack(energies).mean().item(), rel=1e-5)


def test_sampled_thresholds_are_close_and_identical_for_the_same_step():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8))
    config = timm_prune.PruneConfig(sparsity=0.7, target_modules=["0"], threshold_sample=4096)
    pm = timm_prune.convert(model, config)
    pm.penalty()
    first = pm.pruner.candidates_0.clone()
    assert abs(first.float().mean().item() - 0.7) < 0.02  # 4,096 of 262,144 entries sampled
    exact = ~pm.pruner.keep_masks()["0"]
    assert (first.bool() != exact).float().mean().item() < 0.02
    again = timm_prune.convert(nn.Sequential(nn.Linear(512, 512), nn.ReLU(), nn.Linear(512, 8)), config)
    again.load_state_dict(pm.state_dict())
    again.pruner.candidates_selected.fill_(False)
    again.pruner.step.fill_(0)
    again.penalty()
    assert torch.equal(again.pruner.candidates_0, first)  # same step, same sample: DDP ranks agree


def _three_layers() -> nn.Module:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(256, 512), nn.ReLU(), nn.Linear(512, 256), nn.ReLU(), nn.Linear(256, 8))
    with torch.no_grad():
        model[2].weight.mul_(4.0)  # a layer of larger weights: a global threshold prunes it less
    return model


def test_global_candidates_from_one_sample_over_all_layers_match_the_exact_sets():
    levels = [0.5, 0.9]
    counts = {}
    for sample in (0, 8192):
        config = timm_prune.PruneConfig(
            sparsity=0.9, scope="global", penalty_sparsities=levels, threshold_sample=sample, penalty_weight=1.0
        )
        pm = timm_prune.convert(_three_layers(), config)
        pm.pruner.select_candidates()
        counts[sample] = torch.cat([c.flatten() for c in pm.pruner.candidate_counts().values()])
        per_layer = [c.bool().float().mean().item() for c in pm.pruner.candidate_counts().values()]
        assert per_layer[1] + 0.05 < min(per_layer[0], per_layer[2])  # one threshold, not one per layer
    exact, sampled = counts[0], counts[8192]
    assert (exact >= 1).float().mean().item() == pytest.approx(0.9, abs=1e-4)  # in the 90 % set
    assert (exact == 2).float().mean().item() == pytest.approx(0.5, abs=1e-4)  # in both sets
    assert (sampled >= 1).float().mean().item() == pytest.approx(0.9, abs=0.01)
    assert (sampled == 2).float().mean().item() == pytest.approx(0.5, abs=0.02)
    assert (sampled != exact).float().mean().item() < 0.02
