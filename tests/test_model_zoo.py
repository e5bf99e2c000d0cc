"""POF end to end over a table of timm architectures (tests/zoo.py)."""

from __future__ import annotations

import copy
import functools

import pytest
import timm
import torch
from torch.nn.utils import parametrize
from zoo import ZOO

import timm_prune

SPARSITY = 0.6


@functools.lru_cache(maxsize=2)
def _base(name: str, kwargs_items: tuple, size: int):
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5, **dict(kwargs_items)).eval()
    x = torch.randn(2, 3, size, size)
    return model, x


@pytest.fixture(params=ZOO, ids=[entry[0] for entry in ZOO])
def arch(request):
    name, kwargs, size = request.param
    model, x = _base(name, tuple(sorted(kwargs.items())), size)
    return name, kwargs, copy.deepcopy(model), x


def _close(a: torch.Tensor, b: torch.Tensor, rtol: float = 1e-4) -> bool:
    # Relative to the output's scale: some timm inits give activations of 1e-4, others of 1e1.
    return float((a - b).abs().max()) <= rtol * float(b.abs().max()) + 1e-7


def _features(model, x):
    # forward_features: the classifier is never targeted, and some heads start at zero (Mixer), which
    # would make an output comparison vacuous.
    with torch.no_grad():
        out = model.forward_features(x)
    return out[0] if isinstance(out, (tuple, list)) else out


def _targeted_weights(pm) -> list[torch.Tensor]:
    return [module.weight.detach() for module in pm.targets.values()]


def test_convert_keeps_outputs_and_penalty_reaches_every_direction(arch):
    name, _, model, x = arch
    reference = _features(model, x)
    # Per layer: every layer then has candidates (on LAMP scores a small layer may have none at this sparsity).
    pm = timm_prune.convert(model, timm_prune.PruneConfig(sparsity=SPARSITY, scope="layer"))
    assert len(pm.targets) > 0
    assert all(parametrize.is_parametrized(m, "weight") for m in pm.targets.values())
    assert _close(_features(pm.model, x), reference, rtol=1e-5), name

    penalty = pm.penalty()
    assert penalty.dim() == 0 and torch.isfinite(penalty) and penalty.item() > 0
    penalty.backward()
    for layer, module in pm.targets.items():
        direction = module.parametrizations.weight.original1
        grad = direction.grad
        assert grad is not None, f"{name}: no penalty gradient reaches {layer}"
        if direction[0].numel() == 1:
            # One entry per unit (e.g. FastViT's per-channel 1x1 scale convs): u = +-1 whatever v is, so the
            # energy share of the unit cannot move and its gradient is exactly zero.
            assert grad.abs().sum() == 0, f"{name}: {layer} has one entry per unit; its gradient must be 0"
        else:
            assert grad.abs().sum() > 0, f"{name}: no penalty gradient reaches {layer}"


@pytest.mark.parametrize("scope", ["layer", "global", "lamp"])
def test_prune_hits_target_sparsity(arch, scope):
    name, _, model, x = arch
    pm = timm_prune.convert(model, timm_prune.PruneConfig(sparsity=SPARSITY, scope=scope))
    report = pm.prune()
    weights = _targeted_weights(pm)
    zeros = sum(int((w == 0).sum()) for w in weights)
    total = sum(w.numel() for w in weights)
    assert abs(zeros / total - SPARSITY) <= 0.005, f"{name} {scope}: {zeros / total:.4f}"
    assert abs(report.sparsity - zeros / total) < 1e-9
    assert [layer.name for layer in report.layers] == list(pm.targets)
    if scope == "layer":
        for layer in report.layers:
            assert abs(layer.sparsity - SPARSITY) <= 1 / layer.numel, (name, layer.name)
    if scope == "lamp":  # each layer's largest weight scores 1: none is emptied
        assert all(layer.sparsity < 1.0 for layer in report.layers), name
    assert torch.isfinite(_features(pm.model, x)).all()


def test_recover_keeps_zeros_matches_dense_mean_and_merges(arch):
    name, kwargs, model, x = arch
    pm = timm_prune.convert(model, timm_prune.PruneConfig(sparsity=SPARSITY))
    before = {n: m.weight.detach().clone() for n, m in pm.targets.items()}
    pm.prune()
    pruned_out = _features(pm.model, x)
    zeros_pruned = [int((w == 0).sum()) for w in _targeted_weights(pm)]

    pm.recover()
    assert [int((w == 0).sum()) for w in _targeted_weights(pm)] == zeros_pruned
    recovered_out = _features(pm.model, x)

    # Reference built by hand: a plain model whose pruned entries hold their unit's mean.
    plain = pm.merge_and_unload()
    dense_mean = timm.create_model(name, num_classes=5, **kwargs).eval()
    dense_mean.load_state_dict(plain.state_dict(), strict=True)
    for layer, keep in pm.masks.items():
        w = before[layer]
        pruned = ~keep
        means = (w * pruned).flatten(1).sum(1) / pruned.flatten(1).sum(1).clamp_min(1)
        filled = torch.where(keep, w, means.view(-1, *([1] * (w.dim() - 1))).expand_as(w))
        dense_mean.get_submodule(layer).weight.data.copy_(filled)
    assert _close(recovered_out, _features(dense_mean, x)), name

    # merge_and_unload: strict load into a fresh model of the same name, same outputs.
    fresh = timm.create_model(name, num_classes=5, **kwargs).eval()
    fresh.load_state_dict(plain.state_dict(), strict=True)
    assert _close(_features(fresh, x), pruned_out), name
    merged_recovered = pm.merge_and_unload(recovered=True).eval()
    fresh.load_state_dict(merged_recovered.state_dict(), strict=True)
    assert _close(_features(fresh, x), recovered_out), name
    # pm stays usable after merging
    assert _close(_features(pm.model, x), recovered_out)
