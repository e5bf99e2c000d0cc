"""POF's pruned-forward training steps: the pruned model runs, gradients reach every weight, BN stays dense."""

from __future__ import annotations

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_prune

SPARSITIES = [0.5, 0.8]


def _pm(pruned_forward: float, hyperspherical: bool = True, **options) -> timm_prune.PrunableModel:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    config = timm_prune.PruneConfig(
        method="pof", sparsity=0.8, scope="global", penalty_sparsities=SPARSITIES, pruned_forward=pruned_forward,
        hyperspherical=hyperspherical, **options,
    )  # fmt: skip
    pm = timm_prune.convert(model, config)
    pm.penalty()  # selects the candidate sets (and counts one training call)
    return pm


def _bn_buffers(pm: timm_prune.PrunableModel) -> list[torch.Tensor]:
    return [b.clone() for n, b in pm.model.named_buffers() if "running" in n]


@pytest.mark.parametrize("hyperspherical", [True, False])
def test_a_pruned_forward_runs_the_pruned_model_and_leaves_bn_statistics_alone(hyperspherical):
    pm = _pm(pruned_forward=1.0, hyperspherical=hyperspherical).train()
    level = pm.pruner.pruned_forward_level()
    assert level is not None
    x = torch.randn(6, 3, 32, 32)
    # Reference: the same weights as a plain model, with the candidates of that level set to zero.
    plain = pm.merge_and_unload().train()
    counts = dict(zip(pm.targets, pm.pruner.candidate_counts().values(), strict=True))
    with torch.no_grad():
        for name, count in counts.items():
            plain.get_submodule(name).weight.mul_(count < len(SPARSITIES) - level)
    before = _bn_buffers(pm)
    out = pm(x)
    torch.testing.assert_close(out, plain(x), atol=1e-5, rtol=1e-4)
    for a, b in zip(before, _bn_buffers(pm), strict=True):
        assert torch.equal(a, b)
    # Straight-through: the pruned entries get a gradient too.
    out.square().mean().backward()
    name = next(iter(pm.targets))
    grad = pm.pruner.direction(name).grad
    pruned = counts[name] >= len(SPARSITIES) - level
    assert pruned.any() and grad[pruned].abs().sum() > 0
    # Nothing outlives the forward: eval and dense training forwards are the model's own.
    if hyperspherical:
        assert all(m.parametrizations.weight[0].forward_keep is None for m in pm.targets.values())
    else:  # the Parameters the optimizer holds are back in place
        parameters = set(pm.parameters())
        assert all(isinstance(m.weight, torch.nn.Parameter) and m.weight in parameters for m in pm.targets.values())


def _pruned_forward_with_shifted_norms(hold_norms: bool) -> tuple[timm_prune.PrunableModel, torch.Tensor]:
    pm = _pm(pruned_forward=1.0, hold_norms=hold_norms).train()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # a trained model's shifts, so that a lost bias would show in the output
        for m in pm.model.modules():
            if isinstance(m, torch.nn.BatchNorm2d):
                m.bias.copy_(torch.randn(m.bias.shape, generator=generator))
    return pm, pm(torch.randn(6, 3, 32, 32, generator=generator))


def test_hold_norms_keeps_the_pruned_forwards_gradient_off_the_norm_layers():
    grads = {}
    outputs = {}
    for hold_norms in (True, False):
        pm, out = _pruned_forward_with_shifted_norms(hold_norms)
        norms = [m for m in pm.model.modules() if isinstance(m, torch.nn.BatchNorm2d)]
        # The parameters are back in place after the forward: the same Parameter objects the optimizer holds.
        assert all(isinstance(p, torch.nn.Parameter) for m in norms for p in (m.weight, m.bias))
        parameters = set(pm.parameters())
        assert all(p in parameters for m in norms for p in (m.weight, m.bias))
        out.square().mean().backward()
        # A gradient tensor either way (DDP expects every parameter to get one), zero when held.
        grads[hold_norms] = sum(float(m.weight.grad.abs().sum() + m.bias.grad.abs().sum()) for m in norms)
        assert float(pm.pruner.direction(next(iter(pm.targets))).grad.abs().sum()) > 0
        outputs[hold_norms] = out.detach()
    torch.testing.assert_close(outputs[True], outputs[False])  # same forward value
    assert grads[True] == 0 and grads[False] > 0


def test_dense_forwards_and_eval_are_unchanged():
    pm = _pm(pruned_forward=0.0).train()
    x = torch.randn(6, 3, 32, 32)
    before = _bn_buffers(pm)
    pm(x)
    assert any(not torch.equal(a, b) for a, b in zip(before, _bn_buffers(pm), strict=True))
    # In eval mode a pruned-forward model computes exactly what the plain POF model does.
    torch.testing.assert_close(_pm(pruned_forward=1.0).eval()(x), _pm(pruned_forward=0.0).eval()(x))


def test_the_draw_is_seeded_by_the_step_and_follows_the_probability():
    pm = _pm(pruned_forward=0.5)
    draws = []
    for _ in range(300):
        draws.append(pm.pruner.pruned_forward_level())
        assert draws[-1] == pm.pruner.pruned_forward_level()  # same step, same draw
        pm.penalty()
    pruned = [d for d in draws if d is not None]
    assert 0.4 < len(pruned) / len(draws) < 0.6
    assert set(pruned) == {0, 1}


def test_pruned_forward_sparsities_restrict_the_levels_drawn():
    pm = _pm(pruned_forward=1.0, pruned_forward_sparsities=[0.8])
    draws = set()
    for _ in range(60):
        draws.add(pm.pruner.pruned_forward_level())
        pm.penalty()
    assert draws == {SPARSITIES.index(0.8)}
    # The pruned forward really runs that level: as many weights at zero as the 0.8 candidate set holds.
    pm.train()
    seen = []
    layer = pm.model.get_submodule("layer4.0.conv2")
    hook = layer.register_forward_pre_hook(lambda m, _: seen.append(float((m.weight == 0).float().mean())))
    with torch.no_grad():
        pm(torch.randn(2, 3, 32, 32))
    hook.remove()
    counts = pm.pruner.candidate_counts()["layer4.0.conv2"]
    assert seen == [pytest.approx(float((counts > 0).float().mean()))] and seen[0] > 0


@pytest.mark.parametrize("chosen, match", [([0.9], r"\[0.9\] are not among penalty_sparsities"), ([], "non-empty")])
def test_bad_pruned_forward_sparsities_name_the_field_and_the_levels(chosen, match):
    with pytest.raises(ValueError, match=match):
        timm_prune.PruneConfig(method="pof", penalty_sparsities=SPARSITIES, pruned_forward_sparsities=chosen)


def test_training_with_pruned_forwards_reduces_the_loss_of_the_pruned_model():
    torch.manual_seed(1)
    x, y = torch.randn(32, 3, 32, 32), torch.randint(0, 4, (32,))
    losses = {}
    for p in (0.0, 1.0):
        pm = _pm(pruned_forward=p).train()
        optimizer = torch.optim.SGD(pm.parameters(), lr=0.05)
        for _ in range(15):
            loss = F.cross_entropy(pm(x), y)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            pm.penalty()  # counts the step, refreshes candidates; its value is not trained here
        pm.prune()
        pm.recalibrate_batchnorm([x], num_batches=1)
        with torch.no_grad():
            losses[p] = float(F.cross_entropy(pm.eval()(x), y))
    assert losses[1.0] < losses[0.0]


def test_bad_pruned_forward_names_the_field():
    with pytest.raises(ValueError, match="pruned_forward"):
        timm_prune.PruneConfig(method="pof", pruned_forward=1.5)


def test_pruned_forwards_alone_skip_the_energy_pass_but_keep_the_candidates_current():
    # penalty_weight 0: no energy graph (nothing to differentiate), yet the step counter and the refreshed
    # candidate sets that the pruned forwards use advance as with a penalty.
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    config = timm_prune.PruneConfig(
        method="pof", sparsity=0.8, scope="global", penalty_sparsities=SPARSITIES, pruned_forward=1.0,
        penalty_weight=0.0, threshold_refresh=2,
    )  # fmt: skip
    pm = timm_prune.convert(model, config).train()
    first = pm.penalty()
    assert float(first) == 0.0 and first.grad_fn is None and bool(pm.pruner.candidates_selected)
    name = next(iter(pm.targets))
    with torch.no_grad():  # move the smallest weights far out: the next refresh must drop them from the sets
        direction = pm.targets[name].parametrizations.weight.original1
        direction.copy_(torch.where(pm.pruner.candidate_counts()[name] > 0, 10 * direction.sign(), direction))
    for _ in range(2):
        pm.penalty()
    assert int(pm.pruner.step) == 3
    moved = direction.abs() == 10
    assert moved.any() and not (pm.pruner.candidate_counts()[name][moved] > 0).any()


def test_pruned_forwards_stop_after_pruned_forward_until_training_calls():
    pm = _pm(pruned_forward=1.0, pruned_forward_until=3).train()  # _pm's penalty() call is the first
    levels = []
    for _ in range(4):
        levels.append(pm.pruner.pruned_forward_level())
        pm.penalty()
    assert [level is not None for level in levels] == [True, True, False, False]
    with pytest.raises(ValueError, match="pruned_forward_until"):
        timm_prune.PruneConfig(method="pof", pruned_forward=0.5, pruned_forward_until=-1)


@pytest.mark.parametrize("hyperspherical", [True, False])
def test_pruned_forwards_reuse_their_buffers_and_two_forwards_before_one_backward_stay_exact(hyperspherical):
    x1, x2 = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    pm = _pm(pruned_forward=1.0, hyperspherical=hyperspherical, straight_through=False).train()
    layer = pm.model.get_submodule("layer4.0.conv2")
    seen = []
    hook = layer.register_forward_pre_hook(lambda m, _: seen.append(m.weight.data_ptr()))
    for x in (x1, x2):  # one step after the other: the second writes where the first did
        pm(x).square().mean().backward()
    assert seen[0] == seen[1]
    # Two forwards, then one backward: the second may not overwrite what the first graph still needs.
    pm.zero_grad()
    (pm(x1).square().mean() + pm(x2).square().mean()).backward()
    hook.remove()
    assert seen[2] != seen[3]
    together = {n: p.grad.clone() for n, p in pm.named_parameters()}
    pm.zero_grad()
    for x in (x1, x2):
        pm(x).square().mean().backward()
    for name, param in pm.named_parameters():
        torch.testing.assert_close(param.grad, together[name], msg=name)


def test_pruned_forward_loss_weight_scales_the_pruned_forwards_gradient_and_leaves_dense_ones_alone():
    x = torch.randn(6, 3, 32, 32)
    grads, outputs = {}, {}
    for pruned_forward, weight in ((1.0, 1.0), (1.0, 0.25), (0.0, 1.0), (0.0, 0.25)):
        pm = _pm(pruned_forward=pruned_forward, pruned_forward_loss_weight=weight).train()
        out = pm(x)
        out.square().mean().backward()
        outputs[pruned_forward, weight] = out.detach()
        grads[pruned_forward, weight] = {n: p.grad.clone() for n, p in pm.named_parameters() if p.grad is not None}
    torch.testing.assert_close(outputs[1.0, 0.25], outputs[1.0, 1.0])  # the value is the pruned forward's
    assert not torch.allclose(outputs[1.0, 1.0], outputs[0.0, 1.0])
    for name, grad in grads[1.0, 1.0].items():
        torch.testing.assert_close(grads[1.0, 0.25][name], 0.25 * grad, msg=name)
        torch.testing.assert_close(grads[0.0, 0.25][name], grads[0.0, 1.0][name], msg=name)  # dense: untouched


@pytest.mark.parametrize("weight", [0.0, -1.0, "half"])
def test_a_bad_pruned_forward_loss_weight_names_the_field(weight):
    with pytest.raises(ValueError, match="pruned_forward_loss_weight"):
        timm_prune.PruneConfig(method="pof", pruned_forward_loss_weight=weight)


class _TwoBranches(torch.nn.Module):
    """A stem and two heads; ``use_second=False`` leaves the second head out of the forward (and of the graph)."""

    def __init__(self) -> None:
        super().__init__()
        self.stem, self.first, self.second = torch.nn.Linear(8, 8), torch.nn.Linear(8, 3), torch.nn.Linear(8, 3)

    def forward(self, x: torch.Tensor, use_second: bool = True) -> torch.Tensor:
        h = self.stem(x).relu()
        return self.second(h) + self.first(h) if use_second else self.first(h)


@pytest.mark.parametrize("hyperspherical", [True, False])
def test_buffers_come_back_after_a_forward_that_raised_or_left_a_layer_out(hyperspherical):
    torch.manual_seed(0)
    config = timm_prune.PruneConfig(method="pof", sparsity=0.5, scope="layer", pruned_forward=1.0,
                                    hyperspherical=hyperspherical)  # fmt: skip
    pm = timm_prune.convert(_TwoBranches(), config).train()
    pm.penalty()
    seen = []
    pm.model.second.register_forward_pre_hook(lambda m, _: seen.append(m.weight.data_ptr()))
    x = torch.randn(4, 8)
    pm(x).sum().backward()
    pm(x, use_second=False).sum().backward()  # the second head is left out of this graph
    boom = pm.model.first.register_forward_hook(lambda *_: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        pm(x)  # the second head ran, then the forward raised: no backward will come
    boom.remove()
    pm(x).sum().backward()
    assert len(seen) == 3 and seen[0] == seen[1] == seen[2]  # every pruned forward wrote into the same buffer


def test_a_layer_run_twice_in_one_pruned_forward_gets_the_gradient_of_both_uses():
    x, other = torch.randn(6, 3, 32, 32), torch.randn(6, 3, 32, 32)
    pm = _pm(pruned_forward=1.0, straight_through=False).train()
    layer = pm.model.get_submodule("layer4.0.conv2")
    # The layer's (pruned) weight taken a second time within its own forward, on its output.
    layer.register_forward_hook(lambda m, _, out: out + F.conv2d(out, m.weight, None, m.stride, m.padding) * 0.5)
    pm(x).square().mean().backward()
    reused = {n: p.grad.clone() for n, p in pm.named_parameters()}
    # The same step while an earlier graph holds every buffer: both uses get tensors of their own.
    pm.zero_grad()
    held = pm(other)
    pm(x).square().mean().backward()
    del held
    for name, param in pm.named_parameters():
        torch.testing.assert_close(param.grad, reused[name], msg=name)
