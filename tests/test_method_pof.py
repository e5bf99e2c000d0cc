"""POF details: the penalty by hand, warm-up/refresh, polarisation, autocast, DDP, recovery on every conv kind,
BatchNorm re-estimation."""

from __future__ import annotations

import logging
import os
import socket

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
from timm.layers.conv2d_same import Conv2dSame

import timm_prune
from timm_prune import masking


def _mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(12, 16), nn.ReLU(), nn.Linear(16, 8), nn.ReLU(), nn.Linear(8, 3))


def _directions(pm) -> dict[str, torch.Tensor]:
    return {n: m.parametrizations.weight.original1 for n, m in pm.targets.items()}


def test_penalty_equals_candidate_energy_by_hand():
    model = _mlp()
    weights = {n: m.weight.detach().clone() for n, m in model.named_modules() if isinstance(m, nn.Linear)}
    pm = timm_prune.convert(
        model, timm_prune.PruneConfig(sparsity=0.5, scope="layer", penalty_weight=3.0, target_modules=["0", "2"])
    )
    energies = []
    for name in ["0", "2"]:
        w = weights[name]
        u = w / w.norm(dim=1, keepdim=True)
        k = round(0.5 * u.numel())
        candidates = torch.zeros(u.numel(), dtype=torch.bool)
        candidates[u.abs().flatten().argsort()[:k]] = True
        energies.append((u.square().flatten() * candidates).view_as(u).sum(1).mean())
    expected = 3.0 * torch.stack(energies).mean()
    assert pm.penalty().item() == pytest.approx(expected.item(), rel=1e-5)


def test_warmup_ramps_the_penalty_weight():
    config = dict(sparsity=0.5, target_modules=["0", "2"])
    pm = timm_prune.convert(_mlp(), timm_prune.PruneConfig(penalty_warmup=4, **config))
    full = timm_prune.convert(_mlp(), timm_prune.PruneConfig(**config))
    full.load_state_dict(pm.state_dict())
    with torch.no_grad():
        reference = full.penalty().item()  # no_grad: evaluation calls do not advance the step
    assert int(full.pruner.step) == 0
    seen = [pm.penalty().item() for _ in range(6)]
    assert seen == pytest.approx([0.0, 0.25 * reference, 0.5 * reference, 0.75 * reference, reference, reference])
    assert int(pm.pruner.step) == 6 and "pruner.step" in pm.state_dict()


def test_step_counters_read_on_the_host_follow_every_write_to_their_buffers():
    # The counters are read from host copies (a GPU buffer read waits for the device); a checkpoint load, an
    # in-place write or a new tensor must still be seen, or a resumed run would warm up and draw from the wrong step.
    config = dict(sparsity=0.5, target_modules=["0", "2"], penalty_warmup=8, pruned_forward=0.5)
    pm = timm_prune.convert(_mlp(), timm_prune.PruneConfig(**config))
    for _ in range(5):
        pm.penalty()
    assert pm.pruner.steps_taken == int(pm.pruner.step) == 5 and pm.pruner.has_candidates
    resumed = timm_prune.convert(_mlp(), timm_prune.PruneConfig(**config))
    assert resumed.pruner.steps_taken == 0 and not resumed.pruner.has_candidates  # read before the load: cached
    resumed.load_state_dict(pm.state_dict())
    assert resumed.pruner.steps_taken == 5 and resumed.pruner.has_candidates
    draws = [(pm.pruner.pruned_forward_level(), resumed.pruner.pruned_forward_level(), pm.penalty(), resumed.penalty())]
    assert all(a == b and float(c) == pytest.approx(float(d)) for a, b, c, d in draws)
    pm.pruner.step.fill_(2)
    assert pm.pruner.steps_taken == 2
    assert pm.pruner.current_weight() == pytest.approx(2 / 8 * pm.pruner.config.penalty_weight)
    pm.pruner.step = torch.tensor(7)
    assert pm.pruner.steps_taken == 7
    pm.pruner.candidates_selected.fill_(False)
    assert not pm.pruner.has_candidates and pm.pruner.pruned_forward_level() is None
    pm.penalty()  # selects again
    assert pm.pruner.has_candidates and bool(pm.pruner.candidates_selected) and pm.pruner.steps_taken == 8


@pytest.mark.parametrize("scope", ["global", "layer"])
def test_sparsity_ramp_grows_the_candidate_sets_along_the_cubic_schedule(scope):
    config = timm_prune.PruneConfig(
        sparsity=0.6, scope=scope, sparsity_ramp=10, threshold_refresh=1, threshold_sample=0, target_modules=["0", "2"]
    )
    pm = timm_prune.convert(_mlp(), config)
    numel = sum(m.weight.numel() for m in pm.targets.values())
    shares = []
    for _ in range(12):
        pm.penalty()  # call k selects the sets of step k, then counts itself
        shares.append(sum(int((c > 0).sum()) for c in pm.pruner.candidate_counts().values()) / numel)
    assert shares[0] == 0.0  # nothing is a candidate at the ramp's start: the penalty is zero
    for step in (3, 5, 8):
        assert shares[step] == pytest.approx(0.6 * (1 - (1 - step / 10) ** 3), abs=0.03)
    assert shares[10] == shares[11] == pytest.approx(0.6, abs=0.02)
    assert shares == sorted(shares)


def _snapshot(pm) -> dict[str, torch.Tensor]:
    return {n: c.clone() for n, c in pm.pruner._candidates.items()}


def _scramble(pm) -> None:
    with torch.no_grad():
        for v in _directions(pm).values():
            v.copy_(torch.randn_like(v))


def test_candidates_refresh_on_schedule_and_travel_with_the_state_dict():
    config = timm_prune.PruneConfig(sparsity=0.5, threshold_refresh=3, target_modules=["0", "2"])
    pm = timm_prune.convert(_mlp(), config)
    pm.penalty()  # call 0 selects
    first = _snapshot(pm)
    _scramble(pm)  # a fresh selection would now differ
    pm.penalty()
    pm.penalty()  # calls 1 and 2 keep the selection
    assert all(torch.equal(first[n], c) for n, c in pm.pruner._candidates.items())
    resumed = timm_prune.convert(_mlp(), config)
    resumed.load_state_dict(pm.state_dict())  # a checkpoint taken between refreshes
    assert all(torch.equal(first[n], c) for n, c in resumed.pruner._candidates.items())
    assert resumed.penalty().item() == pytest.approx(pm.penalty().item())  # call 3 re-selects in both
    fresh = {n: ~keep for n, keep in pm.pruner.keep_masks().items()}
    assert all(torch.equal(fresh[n], c.bool()) for n, c in pm.pruner._candidates.items())
    assert any(not torch.equal(first[n], c) for n, c in pm.pruner._candidates.items())


def test_penalty_polarises_weights():
    torch.manual_seed(0)
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=4), sparsity=0.7, penalty_weight=1.0)
    optimizer = torch.optim.Adam(pm.parameters(), lr=0.02)
    before = pm.candidate_energy()
    for _ in range(30):
        optimizer.zero_grad()
        pm.penalty().backward()
        optimizer.step()
    after = pm.candidate_energy()
    assert all(after[n] < 0.5 * before[n] for n in before), (before, after)
    # Pruning now removes almost nothing of the weights' energy.
    assert max(after.values()) < 0.1


def test_penalty_under_bf16_autocast_is_float32_and_equal():
    pm = timm_prune.convert(timm.create_model("test_vit", img_size=32, num_classes=4), sparsity=0.6)
    with torch.no_grad():
        plain = pm.penalty()
    x = torch.randn(2, 3, 32, 32)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = pm(x)
        penalty = pm.penalty()
    assert logits.dtype == torch.bfloat16 and penalty.dtype == torch.float32
    assert penalty.item() == pytest.approx(plain.item(), rel=1e-6)
    (logits.float().sum() + penalty).backward()
    assert all(torch.isfinite(v.grad).all() for v in _directions(pm).values())


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, port: int, inputs: torch.Tensor, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        torch.manual_seed(0)
        pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=4).eval(), sparsity=0.6)
        ddp = nn.parallel.DistributedDataParallel(pm)
        loss = ddp(inputs[rank]).square().mean() + pm.penalty()
        loss.backward()
        torch.save({n: v.grad for n, v in _directions(pm).items()}, os.path.join(out_dir, f"grads{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_penalty_gradients_under_ddp_match_single_process(tmp_path):
    inputs = torch.randn(2, 2, 3, 32, 32)
    mp.start_processes(_ddp_worker, args=(_free_port(), inputs, str(tmp_path)), nprocs=2, start_method="fork")
    torch.manual_seed(0)
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=4).eval(), sparsity=0.6)
    loss = (pm(inputs[0]).square().mean() + pm(inputs[1]).square().mean()) / 2 + pm.penalty()
    loss.backward()
    rank0 = torch.load(tmp_path / "grads0.pt")
    rank1 = torch.load(tmp_path / "grads1.pt")
    for name, v in _directions(pm).items():
        torch.testing.assert_close(rank0[name], rank1[name], rtol=0, atol=0)
        torch.testing.assert_close(rank0[name], v.grad, rtol=1e-4, atol=1e-7)


CONVS = {
    "zeros": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=1, padding_mode="reflect"),
    "circular": lambda: nn.Conv2d(4, 6, 3, padding=2, padding_mode="circular", bias=False),
    "replicate_stride2": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="replicate"),
    "same_dilated": lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2),
    "grouped": lambda: nn.Conv2d(4, 6, 3, padding=1, groups=2),
    "depthwise_multiplier": lambda: nn.Conv2d(4, 8, 5, padding=2, groups=4),
    "pointwise": lambda: nn.Conv2d(4, 6, 1),
    "asymmetric_kernel": lambda: nn.Conv2d(4, 6, (1, 3), padding=(0, 1)),
    "tf_same_stride2": lambda: Conv2dSame(4, 6, 3, stride=2),
}


@pytest.mark.parametrize("kind", ["mean", "layer_mean", "renorm"])
@pytest.mark.parametrize("conv", sorted(CONVS))
def test_recovery_is_the_dense_layer_with_filled_entries(conv, kind):
    layer = CONVS[conv]()
    model = nn.Sequential(layer)
    original = layer.weight.detach().clone()
    x = torch.randn(2, 4, 9, 11)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(sparsity=0.6, scope="layer", target_modules=["0"]))
    pm.prune()
    zeros = int((layer.weight == 0).sum())
    pm.recover(kind)
    assert int((layer.weight == 0).sum()) == zeros
    keep = pm.masks["0"]
    pruned = ~keep
    per_unit = (original * pruned).flatten(1).sum(1) / pruned.flatten(1).sum(1).clamp_min(1)
    shape = (-1, 1, 1, 1)
    if kind == "mean":
        filled = torch.where(keep, original, per_unit.view(shape).expand_as(original))
    elif kind == "layer_mean":
        filled = torch.where(keep, original, (original * pruned).sum() / pruned.sum())
    else:
        scale = original.flatten(1).norm(dim=1) / (original * keep).flatten(1).norm(dim=1)
        filled = original * keep * scale.view(shape)
    reference = CONVS[conv]()
    reference.load_state_dict({"weight": filled, **({"bias": layer.bias} if layer.bias is not None else {})})
    with torch.no_grad():
        torch.testing.assert_close(pm(x), reference(x), rtol=1e-5, atol=1e-6)
    pm.recover("none")
    with torch.no_grad():
        # Undone, the layer is the plain pruned conv again.
        torch.testing.assert_close(pm(x), pm.merge_and_unload()(x), rtol=1e-5, atol=1e-6)


def test_linear_recovery_on_token_inputs():
    layer = nn.Linear(10, 7)
    original = layer.weight.detach().clone()
    pm = timm_prune.convert(nn.Sequential(layer), timm_prune.PruneConfig(sparsity=0.7, target_modules=["0"]))
    pm.prune()
    pm.recover()
    keep = pm.masks["0"]
    means = (original * ~keep).sum(1) / (~keep).sum(1).clamp_min(1)
    filled = torch.where(keep, original, means[:, None].expand_as(original))
    x = torch.randn(2, 5, 10)  # (batch, tokens, features) as in ViT blocks
    with torch.no_grad():
        torch.testing.assert_close(pm(x), nn.functional.linear(x, filled, layer.bias), rtol=1e-5, atol=1e-6)


def test_recover_requires_prune_and_rejects_unknown_kind():
    pm = timm_prune.convert(_mlp(), timm_prune.PruneConfig(target_modules=["0"]))
    with pytest.raises(RuntimeError, match="call prune"):
        pm.recover()
    with pytest.raises(ValueError, match="must be one of"):
        pm.recover("median")
    with pytest.raises(RuntimeError, match="call recover"):
        pm.merge_and_unload(recovered=True)


def test_global_threshold_never_concatenates(monkeypatch):
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=4), sparsity=0.5, scope="global")

    def no_cat(*args, **kwargs):
        raise AssertionError("global pruning concatenated the weights")

    monkeypatch.setattr(torch, "cat", no_cat)
    monkeypatch.setattr(masking, "_CHUNK", 1 << 12)
    report = pm.prune()
    assert abs(report.sparsity - 0.5) < 1e-4
    assert len({round(layer.sparsity, 3) for layer in report.layers}) > 1  # layers differ under one threshold


def test_recalibrate_batchnorm_matches_batch_statistics():
    torch.manual_seed(0)
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=4), sparsity=0.9)
    pm.prune()
    pm.eval()
    batches = [(torch.randn(4, 3, 32, 32), torch.zeros(4)) for _ in range(3)]
    bn = pm.model.bn1 if hasattr(pm.model, "bn1") else next(m for m in pm.modules() if isinstance(m, nn.BatchNorm2d))
    seen = []
    handle = bn.register_forward_hook(lambda m, args, out: seen.append(args[0].mean(dim=(0, 2, 3))))
    used = pm.recalibrate_batchnorm(batches + batches, num_batches=3)
    handle.remove()
    assert used == 3 and len(seen) == 3
    torch.testing.assert_close(bn.running_mean, torch.stack(seen).mean(0), rtol=1e-4, atol=1e-6)
    assert not pm.training and bn.momentum == 0.1 and int(bn.num_batches_tracked) == 3


def test_recalibrate_without_batchnorm_is_a_logged_no_op(caplog):
    pm = timm_prune.convert(timm.create_model("test_vit", img_size=32, num_classes=4), sparsity=0.5)
    with caplog.at_level(logging.WARNING):
        assert pm.recalibrate_batchnorm([torch.randn(2, 3, 32, 32)]) == 0
    assert "no BatchNorm layers" in caplog.text


@pytest.mark.parametrize("hyperspherical", [True, False])
def test_candidate_decay_shrinks_each_candidate_by_its_share_of_the_sets(hyperspherical):
    """candidate_decay=d after the optimizer step: an entry in c of the n nested sets keeps 1 - d * c / n of its value
    (ramped in with the warm-up), every other entry is untouched, and the optimizer's Parameters stay in place."""
    config = timm_prune.PruneConfig(
        sparsity=0.5,
        scope="layer",
        penalty_weight=0.0,
        penalty_sparsities=[0.25, 0.5],
        candidate_decay=0.2,
        penalty_warmup=4,
        hyperspherical=hyperspherical,
        target_modules=["0", "2"],
    )
    pm = timm_prune.convert(_mlp(), config)
    params = {n: pm.pruner.direction(n) for n in ("0", "2")}
    assert pm.on_step_end() == {}  # no candidates selected yet: nothing to shrink
    pm.penalty()  # one training call: selects the candidates, warm-up at 1 / 4
    before = {n: p.detach().clone() for n, p in params.items()}
    counts = pm.pruner.candidate_counts()
    logs = pm.on_step_end(step=1, total_steps=10)
    assert logs["pof/candidate_decay"] == pytest.approx(0.05)
    for name, param in params.items():
        assert pm.pruner.direction(name) is param
        c = counts[name].float()
        assert (c == 2).any() and (c == 1).any() and (c == 0).any()
        torch.testing.assert_close(param.detach(), before[name] * (1 - 0.05 * c / 2))
    assert pm.penalty().item() == 0.0  # the decay is no penalty: nothing goes through the gradient


def test_penalty_every_k_calls_carries_k_times_the_weight():
    """penalty_every=3: calls 1, 4, 7 return three times the every-call penalty, with three times its gradient;
    the calls between return zero and leave the gradients alone."""
    config = dict(sparsity=0.5, scope="layer", penalty_weight=2.0, target_modules=["0", "2"], threshold_refresh=100)
    torch.manual_seed(0)
    every_call = timm_prune.convert(_mlp(), timm_prune.PruneConfig(**config))
    sparse = timm_prune.convert(_mlp(), timm_prune.PruneConfig(penalty_every=3, **config))
    sparse.load_state_dict(every_call.state_dict())
    seen = []
    for call in range(7):
        reference = every_call.penalty()
        penalty = sparse.penalty()
        seen.append(penalty.item())
        if call % 3 == 0:
            assert penalty.item() == pytest.approx(3 * reference.item(), rel=1e-6)
            reference.backward()
            penalty.backward()
            for name in ("0", "2"):
                ours, theirs = _directions(sparse)[name].grad, _directions(every_call)[name].grad
                torch.testing.assert_close(ours, 3 * theirs)
            every_call.zero_grad()
            sparse.zero_grad()
        else:
            assert penalty.item() == 0.0 and not penalty.requires_grad
    assert sum(v > 0 for v in seen) == 3
    with torch.no_grad():  # evaluation calls report the penalty itself, unscaled
        assert sparse.penalty().item() == pytest.approx(every_call.penalty().item(), rel=1e-6)
