"""SLR (surrogate Lagrangian relaxation): penalty, once-an-epoch updates, hard prune, checkpoints, several processes."""

from __future__ import annotations

import math
import os
import socket

import pytest
import safetensors.torch
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
import torch.nn as nn
import torch.nn.functional as F

import timm_prune
from timm_prune.methods.slr import SlrMethod, resolve_layer_sparsity

# Tiny tensors on 2 shared cores: one intra-op thread is much faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def make_model(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return timm.create_model("test_resnet", num_classes=4)


def make_batches(n: int = 4, seed: int = 1) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(8, 3, 16, 16, generator=g), torch.randint(0, 4, (8,), generator=g)) for _ in range(n)]


def train_epoch(pm: timm_prune.PrunableModel, opt: torch.optim.Optimizer, batches) -> float:
    """One epoch of task loss + SLR penalty; returns the mean task loss (what on_epoch_end expects)."""
    pm.train()
    total = 0.0
    for x, y in batches:
        loss = F.cross_entropy(pm(x), y)
        (loss + pm.penalty()).backward()
        opt.step()
        opt.zero_grad()
        total += float(loss.detach())
    return total / len(batches)


def lagrangian(f: float, w: dict, z: dict, lam: dict, rho: float) -> float:
    """Test-side surrogate Lagrangian f + sum rho/2 ||W - Z + U||^2 - rho/2 ||U||^2, U = Lambda / rho."""
    total = f
    for n in w:
        u = lam[n].double() / rho
        total += rho / 2 * ((w[n].double() - z[n].double() + u).square().sum() - u.square().sum()).item()
    return total


def project(v: torch.Tensor, sparsity: float) -> torch.Tensor:
    """Test-side projection: keep the numel - round(p * numel) largest |v| (topk, independent of masking.py)."""
    keep = v.numel() - int(round(sparsity * v.numel()))
    out = torch.zeros_like(v).reshape(-1)
    idx = v.reshape(-1).abs().topk(keep).indices
    out[idx] = v.reshape(-1)[idx]
    return out.reshape(v.shape)


def snapshot(pruner: SlrMethod) -> dict:
    names = list(pruner.layers)
    return {
        "w": {n: pruner.weight(n).detach().float().clone() for n in names},
        "z": {n: pruner.state_of(n).z.clone() for n in names},
        "lam": {n: pruner.state_of(n).lam.clone() for n in names},
        "w_prev": {n: pruner.state_of(n).w_prev.clone() for n in names},
        "z_prev": {n: pruner.state_of(n).z_prev.clone() for n in names},
        "k": int(pruner.k),
        "s": float(pruner.step_size),
    }


def slr_buffers(pm: timm_prune.PrunableModel) -> dict[str, torch.Tensor]:
    return {k: v for k, v in pm.state_dict().items() if k.startswith("pruner.")}


# ---------------------------------------------------------------------------------------------- config
def test_defaults_are_the_code_defaults_and_json_round_trips():
    config = timm_prune.PruneConfig(method="slr", sparsity=0.6)
    assert (config.rho, config.M, config.r, config.initial_step, config.layer_sparsity) == (0.1, 300.0, 0.1, 0.01, None)
    assert "slr" in timm_prune.list_methods()
    config = timm_prune.PruneConfig(method="slr", sparsity=0.6, rho=1, layer_sparsity={"fc": 0, "layer4.*": 0.9})
    again = timm_prune.PruneConfig.from_json(config.to_json())
    assert again == config
    assert again.layer_sparsity == {"fc": 0.0, "layer4.*": 0.9}


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("rho", 0),
        ("rho", float("inf")),
        ("M", 1),
        ("M", True),
        ("r", 0),
        ("r", 1.0),
        ("initial_step", -0.01),
        ("initial_step", "0.01"),
        ("layer_sparsity", {"fc": 1.0}),
        ("layer_sparsity", {"fc": -0.1}),
        ("layer_sparsity", {"(": 0.5}),
        ("layer_sparsity", {3: 0.5}),
        ("layer_sparsity", ["fc"]),
    ],
)
def test_invalid_fields_raise_naming_the_field(field, value):
    with pytest.raises(ValueError, match=rf"PruneConfig\.{field}"):
        timm_prune.PruneConfig(method="slr", **{field: value})


def test_layer_sparsity_resolution_and_its_errors():
    names = ["layer1.0.conv1", "layer1.0.conv2", "layer4.0.conv1", "head.fc"]
    got = resolve_layer_sparsity(names, 0.5, {"layer1.0.conv1": 0.2, "conv2": 0.3, r"layer4\..*": 0.9})
    assert got == {"layer1.0.conv1": 0.2, "layer1.0.conv2": 0.3, "layer4.0.conv1": 0.9, "head.fc": 0.5}
    # The exact name wins over a suffix that says something else.
    assert resolve_layer_sparsity(names, 0.5, {"conv1": 0.1, "layer1.0.conv1": 0.7})["layer1.0.conv1"] == 0.7
    with pytest.raises(ValueError, match="match no targeted layer"):
        resolve_layer_sparsity(names, 0.5, {"conv9": 0.1})
    with pytest.raises(ValueError, match="different sparsities"):
        resolve_layer_sparsity(names, 0.5, {"conv1": 0.1, r"layer1\..*": 0.2})
    with pytest.raises(ValueError, match="layer_sparsity cannot be combined with scope='global'"):
        timm_prune.convert(make_model(), method="slr", scope="global", layer_sparsity={"conv2": 0.5})
    with pytest.raises(ValueError, match="train_loss"):
        timm_prune.convert(make_model(), method="slr").on_epoch_end(epoch=1)


# ---------------------------------------------------------------------------------------------- penalty
def test_conversion_initialises_z_as_the_projection_and_the_penalty_matches():
    model = make_model()
    x = make_batches(1)[0][0]
    model.eval()
    with torch.no_grad():
        before = model(x)
    pm = timm_prune.convert(model, method="slr", sparsity=0.6, rho=0.5, penalty_weight=2.0)
    pm.eval()
    with torch.no_grad():
        assert torch.equal(pm(x), before)  # SLR does not re-parametrise the layers
    pruner = pm.pruner
    expected = 0.0
    for name in pruner.layers:
        w = pruner.weight(name).detach()
        state = pruner.state_of(name)
        assert torch.equal(state.z, project(w, 0.6)), name
        assert torch.equal(state.z_prev, state.z) and torch.equal(state.w_prev, w)
        assert state.w_prev.data_ptr() != w.data_ptr()  # a copy, not the live parameter
        assert not state.lam.any()
        expected += 0.5 / 2 * (w - state.z).double().square().sum().item()
    penalty = pm.penalty()
    assert penalty.dim() == 0 and penalty.requires_grad
    assert penalty.item() == pytest.approx(2.0 * expected, rel=1e-5)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert pm.penalty().dtype == torch.float32
    penalty.backward()
    name = next(iter(pruner.layers))
    w = pruner.weight(name)
    # d/dW of 2 * 0.5/2 ||W - Z||^2 is 2 * 0.5 * (W - Z): zero exactly on the kept entries.
    assert torch.allclose(w.grad, 2 * 0.5 * (w.detach() - pruner.state_of(name).z), atol=1e-6)


def test_penalty_shrinks_the_distance_to_the_constraint():
    batches = make_batches()

    def run(penalty_weight: float) -> list[float]:
        pm = timm_prune.convert(make_model(), method="slr", sparsity=0.7, rho=1.0, penalty_weight=penalty_weight)
        opt = torch.optim.SGD(pm.parameters(), lr=0.05)
        return [pm.on_epoch_end(train_loss=train_epoch(pm, opt, batches))["slr/gap_rel"] for _ in range(6)]

    with_penalty = run(1.0)
    without = run(0.0)
    # ||W - Z|| / ||W|| after each epoch: falls every epoch with the penalty, by far more than without it.
    assert all(b < a for a, b in zip(with_penalty, with_penalty[1:], strict=False)), with_penalty
    assert with_penalty[-1] < 0.5 * with_penalty[0]
    assert with_penalty[-1] < 0.5 * without[-1], (with_penalty, without)


# ---------------------------------------------------------------------------------------------- updates
def test_each_accepted_update_lowers_the_surrogate_lagrangian_and_rejected_ones_keep_lambda(monkeypatch):
    """Both checks verified against a test-side Lagrangian, through the public on_epoch_end."""
    rho = 0.5
    pm = timm_prune.convert(make_model(), method="slr", sparsity=0.7, rho=rho, layer_sparsity={"layer4.0.conv2": 0.9})
    pruner = pm.pruner
    seen = {"accepted_w": 0, "rejected_w": 0, "accepted_z": 0, "rejected_z": 0}
    original_w, original_z = pruner.multiplier_step, pruner.z_step

    prev_losses = []

    def checked_multiplier_step(loss: float, prev_loss: float):
        prev_losses.append(prev_loss)
        before = snapshot(pruner)
        out = original_w(loss, prev_loss)
        after = snapshot(pruner)
        new = lagrangian(loss, before["w"], before["z_prev"], before["lam"], rho)
        old = lagrangian(prev_loss, before["w_prev"], before["z_prev"], before["lam"], rho)
        assert out["slr/lagrangian_w_new"] == pytest.approx(new, rel=1e-6)
        assert out["slr/lagrangian_w_old"] == pytest.approx(old, rel=1e-6)
        if out["slr/accepted_w"]:
            assert before["k"] == 1 or new < old
            seen["accepted_w"] += before["k"] > 1
            assert after["k"] == before["k"] + 1
            for n in before["w"]:
                move = after["s"] * (before["w"][n] - before["z_prev"][n])
                assert torch.allclose(after["lam"][n], before["lam"][n] + move, atol=1e-6)
                assert torch.equal(after["w_prev"][n], before["w"][n]) and torch.equal(
                    after["z_prev"][n], before["z"][n]
                )
        else:
            assert new >= old
            seen["rejected_w"] += 1
            assert (after["k"], after["s"]) == (before["k"], before["s"])
            for key in ("lam", "w_prev", "z_prev"):
                assert all(torch.equal(after[key][n], before[key][n]) for n in before["w"])
        return out

    def checked_z_step(loss: float, prev_loss: float):
        before = snapshot(pruner)
        out = original_z(loss, prev_loss)
        after = snapshot(pruner)
        for n in before["w"]:
            target = pruner.sparsities[n]
            assert torch.equal(after["z"][n], project(before["w"][n] + before["lam"][n] / rho, target)), n
        new = lagrangian(loss, before["w"], after["z"], before["lam"], rho)
        old = lagrangian(prev_loss, before["w"], before["z_prev"], before["lam"], rho)
        assert out["slr/lagrangian_z_new"] == pytest.approx(new, rel=1e-6)
        if out["slr/accepted_z"]:
            assert new < old
            seen["accepted_z"] += 1
            for n in before["w"]:
                move = after["s"] * (before["w"][n] - after["z"][n])
                assert torch.allclose(after["lam"][n], before["lam"][n] + move, atol=1e-6)
                assert torch.equal(after["z_prev"][n], after["z"][n])
                assert after["z_prev"][n].data_ptr() != after["z"][n].data_ptr()
        else:
            assert new >= old
            seen["rejected_z"] += 1
            assert all(torch.equal(after["lam"][n], before["lam"][n]) for n in before["w"])
            assert (after["k"], after["s"]) == (before["k"], before["s"])
        return out

    monkeypatch.setattr(pruner, "multiplier_step", checked_multiplier_step)
    monkeypatch.setattr(pruner, "z_step", checked_z_step)
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    batches = make_batches()
    # Epoch 4 reports a loss far above epoch 3's: the surrogate Lagrangian rises, both checks must reject.
    reported = []
    for epoch in range(6):
        loss = train_epoch(pm, opt, batches)
        reported.append(loss + (1e3 if epoch == 3 else 0.0))
        pm.on_epoch_end(train_loss=reported[-1])
    assert seen["accepted_w"] >= 3 and seen["accepted_z"] >= 3, seen
    assert seen["rejected_w"] >= 1 and seen["rejected_z"] >= 1, seen
    assert float(pruner.prev_loss) == pytest.approx(reported[-1])
    # The first call has no previous loss: both sides use the current one; later calls the previous epoch's.
    assert prev_losses[0] == pytest.approx(reported[0]) and prev_losses[1:] == pytest.approx(reported[:-1])
    # The penalty with non-zero multipliers: rho/2 * sum ||W - Z + Lambda/rho||^2.
    state = snapshot(pruner)
    assert any(lam.abs().sum() > 0 for lam in state["lam"].values())
    expected = sum(
        rho / 2 * (state["w"][n].double() - state["z"][n] + state["lam"][n] / rho).square().sum().item()
        for n in state["w"]
    )
    assert pm.penalty().item() == pytest.approx(expected, rel=1e-5)


def test_rejected_update_restores_the_multipliers_exactly():
    pm = timm_prune.convert(make_model(), method="slr", sparsity=0.5, rho=1.0)
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    batches = make_batches()
    for _ in range(2):
        logs = pm.on_epoch_end(train_loss=train_epoch(pm, opt, batches))
    assert logs["slr/accepted_w"] and logs["slr/accepted_z"]
    train_epoch(pm, opt, batches)
    before = snapshot(pm.pruner)
    assert any(t.abs().sum() > 0 for t in before["lam"].values())
    logs = pm.on_epoch_end(train_loss=1e6)  # a huge loss increase: no update may be accepted
    assert not logs["slr/accepted_w"] and not logs["slr/accepted_z"]
    after = snapshot(pm.pruner)
    for key in ("lam", "w_prev", "z_prev"):
        assert all(torch.equal(after[key][n], before[key][n]) for n in before["w"]), key
    assert (after["k"], after["s"]) == (before["k"], before["s"])


def test_step_size_schedule():
    assert SlrMethod.alpha(1, 300, 0.1) == pytest.approx(1 - 1 / 300)
    k = 50
    assert SlrMethod.alpha(k, 300, 0.1) == pytest.approx(1 - 1 / (300 * k ** (1 - 1 / k**0.1)))
    assert all(0 < SlrMethod.alpha(k, 300, 0.1) < SlrMethod.alpha(k + 1, 300, 0.1) < 1 for k in range(1, 200))
    # The first update is forced (k == 1) and uses s0 unchanged; later accepted ones rescale it.
    pm = timm_prune.convert(make_model(), method="slr", sparsity=0.5, initial_step=0.03)
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    batches = make_batches()
    before = snapshot(pm.pruner)
    pm.pruner.multiplier_step(train_epoch(pm, opt, batches), float("inf"))
    after = snapshot(pm.pruner)
    assert after["k"] == 2 and after["s"] == pytest.approx(0.03)
    name = next(iter(before["w"]))
    w_trained = pm.pruner.weight(name).detach()
    assert torch.allclose(after["lam"][name], 0.03 * (w_trained - before["z_prev"][name]), atol=1e-7)


# ---------------------------------------------------------------------------------------------- prune
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_hard_prune_meets_the_exact_sparsity(scope):
    overrides = {"layer4.0.conv2": 0.9, "downsample.1": 0.3, r"layer1\.0\..*": 0.0} if scope == "layer" else None
    pm = timm_prune.convert(make_model(), method="slr", sparsity=0.7, scope=scope, layer_sparsity=overrides)
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    batches = make_batches()
    for _ in range(2):
        pm.on_epoch_end(train_loss=train_epoch(pm, opt, batches))
    x = batches[0][0]
    report = pm.prune()
    plain = pm.merge_and_unload()
    targets = dict(pm.targets)
    if scope == "layer":
        expected = {
            "layer4.0.conv2": 0.9,
            "layer2.0.downsample.1": 0.3,
            "layer3.0.downsample.1": 0.3,
            "layer4.0.downsample.1": 0.3,
            "layer1.0.conv1": 0.0,
            "layer1.0.conv2": 0.0,
        }
        for name in targets:
            p = expected.get(name, 0.7)
            weight = plain.get_submodule(name).weight
            assert int((weight == 0).sum()) == int(round(p * weight.numel())), name
            assert pm.masks[name].sum() == weight.numel() - int(round(p * weight.numel()))
    else:
        total = sum(plain.get_submodule(n).weight.numel() for n in targets)
        zeros = sum(int((plain.get_submodule(n).weight == 0).sum()) for n in targets)
        assert zeros == int(round(0.7 * total))
    assert report.sparsity == pytest.approx(
        sum(int((plain.get_submodule(n).weight == 0).sum()) for n in targets) / report.numel
    )
    # recover() works as for every method: same zero pattern, recovered outputs differ from the bare pruned ones.
    pm.eval()
    with torch.no_grad():
        bare = pm(x)
        pm.recover()
        recovered = pm(x)
    assert not torch.allclose(bare, recovered)
    for name in targets:
        assert torch.equal(pm.merge_and_unload().get_submodule(name).weight == 0, plain.get_submodule(name).weight == 0)


# ---------------------------------------------------------------------------------------------- checkpoints
def test_checkpoint_round_trip_reproduces_the_slr_state_and_its_future(tmp_path):
    config = timm_prune.PruneConfig(method="slr", sparsity=0.6, rho=0.5, layer_sparsity={"layer4.0.conv2": 0.8})
    pm = timm_prune.convert(make_model(0), config)
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    batches = make_batches()
    for _ in range(3):
        pm.on_epoch_end(train_loss=train_epoch(pm, opt, batches))
    state = pm.state_dict()
    # Safetensors (what accelerate's save_state writes) refuses shared storage: every buffer must be its own copy.
    path = tmp_path / "model.safetensors"
    safetensors.torch.save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    fresh = timm_prune.convert(make_model(seed=123), config)
    assert not all(torch.equal(a, slr_buffers(pm)[k]) for k, a in slr_buffers(fresh).items())
    fresh.load_state_dict(safetensors.torch.load_file(str(path)))
    saved = slr_buffers(pm)
    loaded = slr_buffers(fresh)
    assert saved.keys() == loaded.keys() and len(saved) == 4 * len(pm.targets) + 4
    for key, value in saved.items():
        assert torch.equal(loaded[key], value) or (value.isnan().all() and loaded[key].isnan().all()), key
    for name in ("k", "step_size", "prev_loss", "epochs"):
        assert torch.equal(getattr(fresh.pruner, name), getattr(pm.pruner, name))
    assert int(fresh.pruner.epochs) == 3 and int(fresh.pruner.k) > 1

    # Resuming: one more identical epoch on both gives identical decisions and state.
    opt_fresh = torch.optim.SGD(fresh.parameters(), lr=0.05)
    logs = pm.on_epoch_end(train_loss=train_epoch(pm, opt, batches))
    logs_fresh = fresh.on_epoch_end(train_loss=train_epoch(fresh, opt_fresh, batches))
    assert logs == logs_fresh
    for key, value in slr_buffers(pm).items():
        assert torch.equal(slr_buffers(fresh)[key], value), key


def test_save_pretrained_and_from_pretrained_keep_the_pruned_model(tmp_path):
    pm = timm_prune.convert(make_model(), method="slr", sparsity=0.6, layer_sparsity={"layer4.0.conv2": 0.9})
    opt = torch.optim.SGD(pm.parameters(), lr=0.05)
    batches = make_batches(2)
    pm.on_epoch_end(train_loss=train_epoch(pm, opt, batches))
    pm.prune()
    pm.recover()
    pm.save_pretrained(str(tmp_path / "out"))
    loaded = timm_prune.from_pretrained(str(tmp_path / "out"))
    assert loaded.config == pm.config and loaded.config.layer_sparsity == {"layer4.0.conv2": 0.9}
    pm.eval()
    with torch.no_grad():
        assert torch.allclose(loaded(batches[0][0]), pm(batches[0][0]), atol=1e-5)
    weight = loaded.merge_and_unload().get_submodule("layer4.0.conv2").weight
    assert int((weight == 0).sum()) == int(round(0.9 * weight.numel()))


# ---------------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tiny_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 8, 3), nn.ReLU(), nn.Conv2d(8, 8, 3), nn.Flatten(), nn.Linear(8 * 4 * 4, 4))


def _worker(rank: int, port: int, out_dir: str) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    try:
        pm = timm_prune.convert(_tiny_model(), method="slr", sparsity=0.5, rho=1.0)
        opt = torch.optim.SGD(pm.parameters(), lr=0.05)
        g = torch.Generator().manual_seed(0)  # same data on both ranks, so W stays identical (as under DDP)
        x, y = torch.randn(8, 3, 8, 8, generator=g), torch.randint(0, 4, (8,), generator=g)
        logs = []
        # Each rank reports a different loss (as per-rank means do); decisions must use their mean on both ranks.
        for epoch in range(4):
            (F.cross_entropy(pm(x), y) + pm.penalty()).backward()
            opt.step()
            opt.zero_grad()
            local = [[1.0, 0.9, 0.8, 0.7], [1.0, 0.9, 0.9, 0.7]][rank][epoch]
            logs.append(pm.on_epoch_end(train_loss=local))
        torch.save({"logs": logs, "buffers": slr_buffers(pm)}, os.path.join(out_dir, f"rank{rank}.pt"))
    finally:
        dist.destroy_process_group()


@pytest.mark.skipif("fork" not in mp.get_all_start_methods(), reason="needs the fork start method")
def test_two_processes_agree_on_decisions_and_state(tmp_path):
    # fork: the children inherit the imported modules (spawn re-imports torch, timm and timm_prune: ~10 s more).
    mp.start_processes(_worker, args=(_free_port(), str(tmp_path)), nprocs=2, join=True, start_method="fork")
    r0 = torch.load(tmp_path / "rank0.pt")
    r1 = torch.load(tmp_path / "rank1.pt")
    assert r0["logs"] == r1["logs"]
    assert [log["slr/train_loss"] for log in r0["logs"]] == pytest.approx([1.0, 0.9, 0.85, 0.7])
    for key, value in r0["buffers"].items():
        assert torch.equal(r1["buffers"][key], value) or math.isnan(float(value.reshape(-1)[0])), key


def test_all_reduce_is_used_when_distributed(monkeypatch):
    """Without spawning: the epoch loss goes through an all-reduce (SUM, then / world size) when distributed."""
    calls = []
    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 4)
    monkeypatch.setattr(dist, "get_backend", lambda: "gloo")

    def fake_all_reduce(t: torch.Tensor) -> None:
        calls.append(t.device.type)
        t.add_(3.0 + 5.0 + 7.0)  # the three other ranks' losses

    monkeypatch.setattr(dist, "all_reduce", fake_all_reduce)
    pm = timm_prune.convert(_tiny_model(), method="slr", sparsity=0.5)
    logs = pm.on_epoch_end(train_loss=torch.tensor(1.0))
    assert calls == ["cpu"]
    assert logs["slr/train_loss"] == pytest.approx(4.0)
    assert float(pm.pruner.prev_loss) == pytest.approx(4.0)
