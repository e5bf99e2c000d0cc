"""PSAP: adaptive per-group ratios, the protective rule, soft -> hard pruning, save -> from_pretrained, recipe."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import timm
import torch
import torch.nn as nn
import torch.nn.functional as F

import timm_prune
from timm_prune.methods import psap_select as sel
from timm_prune.structured.measure import measure_flops

REPO = Path(__file__).resolve().parents[1]


# Tiny tensors on 2 shared cores: one intra-op thread is much faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


ARCHS = {"test_resnet": {}, "test_convnext": {}, "test_vit": {"img_size": 32}}


def make(name: str = "test_resnet", **config) -> timm_prune.PrunableModel:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **ARCHS.get(name, {}))
    config.setdefault("latency_runs", 0)
    return timm_prune.convert(model, method="psap", **config)


def data(n: int = 8, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def train(pm: timm_prune.PrunableModel, steps: int, lr: float = 0.01) -> list[dict]:
    optimizer = torch.optim.SGD(pm.parameters(), lr=lr, momentum=0.9)
    x, y = data()
    pm.train()
    logs = []
    for _ in range(steps):
        F.cross_entropy(pm(x), y).backward()
        optimizer.step()
        logs.append(pm.on_step_end())
        optimizer.zero_grad()
    return logs


def filter_rows(pm: timm_prune.PrunableModel, group: int) -> list[tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    """(layer, output rows, filter index of each row) of every layer producing channels of ``group``."""
    state = pm.pruner.channel_graph
    off, n = state.layout[group]
    out = []
    for name, index in state.out_maps.items():
        rows = torch.nonzero((index >= off) & (index < off + n)).flatten()
        if len(rows):
            out.append((state.modules[name], rows, index[rows] - off))
    return out


# ---------------------------------------------------------------------------- adaptive ratios
def test_allocation_is_proportional_capped_and_exact() -> None:
    # Real counts 1.5, 4.5, 6 (lam = 1.5) -> floors 1, 4, 6 and one remainder: the tie goes to the first group.
    assert sel.allocate_counts([10, 10, 20], [9, 9, 18], [0.1, 0.3, 0.2], 12) == [2, 4, 6]
    # A dominant group hits its cap; the rest is shared in proportion by the others.
    counts = sel.allocate_counts([10, 10, 20], [9, 9, 18], [1.0, 0.01, 0.01], 15)
    assert sum(counts) == 15 and counts[0] == 9 and counts[2] == pytest.approx(2 * counts[1], abs=1)
    with pytest.raises(ValueError, match="at most 36"):
        sel.allocate_counts([10, 10, 20], [9, 9, 18], [1, 1, 1], 37)
    assert sel.group_caps([10, 2, 1], 0.9) == [9, 1, 0]  # never a group's last filter
    assert sel.adaptive_weights([0.2, 0.0], 0.0) == [1.0, 1.0]  # adaptivity 0: uniform ratios
    assert sel.schedule_fraction(1, 4, "linear") == 0.25 and sel.schedule_fraction(4, 4, "cubic") == 1.0
    assert sel.schedule_fraction(1, 4, "cubic") > 0.25  # cubic prunes early, slows down at the end


def test_ratios_follow_group_sparsity_and_meet_the_target_exactly() -> None:
    pm = make(sparsity=0.5, prune_every=1, prune_steps=3, protect=None)
    x, _ = data()
    pm(x)  # the first forward builds the channel groups
    state = pm.pruner.channel_graph
    sizes = [n for _, n in state.layout]
    # Make one mid-sized group much sparser: 70% of its filter weights set to exactly zero.
    sparse = max(range(len(sizes)), key=lambda g: (sizes[g] == 32, sizes[g]))
    with torch.no_grad():
        for layer, rows, _ in filter_rows(pm, sparse):
            w = layer.weight[rows]
            layer.weight[rows] = w * (torch.rand_like(w) > 0.7)
    totals = []
    for k in (1, 2, 3):
        logs = pm.on_step_end()
        plan = pm.pruner.last_plan
        counts, sparsity = plan["counts"], plan["sparsity"]
        phi = sel.schedule_fraction(k, 3, "cubic")
        assert sum(counts) == round(phi * 0.5 * state.total)  # exact at every step
        totals.append(sum(counts))
        assert logs["psap/prune_step"] == k
        # The sparse group measures as sparse and gets the largest ratio.
        assert sparsity[sparse] > 0.6 and max(sparsity[g] for g in range(len(sizes)) if g != sparse) < 0.2
        ratios = [c / n for c, n in zip(counts, sizes, strict=True)]
        assert ratios[sparse] == max(ratios) and ratios[sparse] > 1.5 * sorted(ratios)[len(ratios) // 2]
        # Uncapped groups prune in proportion to their sparsity (one filter of rounding).
        caps = sel.group_caps(sizes, 0.9)
        free = [g for g in range(len(sizes)) if counts[g] < caps[g] and sparsity[g] > 0]
        lam = sum(counts[g] for g in free) / sum(sparsity[g] * sizes[g] for g in free)
        for g in free:
            assert abs(counts[g] - lam * sparsity[g] * sizes[g]) <= 1 + 0.05 * counts[g], (g, counts, sparsity)
    assert totals[0] < totals[1] < totals[2] == round(0.5 * state.total)
    assert int(pm.pruner.pruned.sum()) == round(0.5 * state.total)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the schedule is complete: no catch-up step, no warning
        report = pm.prune()
    assert report.filters_after == state.total - round(0.5 * state.total)


def test_uniform_ratios_without_adaptivity() -> None:
    pm = make(sparsity=0.5, prune_every=1, prune_steps=1, adaptivity=0.0, protect=None)
    pm(data()[0])
    pm.on_step_end()
    counts, sizes = pm.pruner.last_plan["counts"], pm.pruner.last_plan["sizes"]
    assert all(abs(c - 0.5 * n) <= 1 for c, n in zip(counts, sizes, strict=True)), (counts, sizes)


# ---------------------------------------------------------------------------- protective rule
def _gradient_on_one_filter(protect: float | None) -> tuple[timm_prune.PrunableModel, int, int, dict]:
    """Prune by magnitude, then back-propagate a loss that depends strongly on pruned filter ``a`` (through its
    consumer's gated input) and not at all on pruned filter ``b``; returns the model after the next step."""
    pm = make(sparsity=0.6, prune_every=1, prune_steps=2, schedule="linear", protect=protect)
    x, _ = data()
    pm.train()
    pm(x)  # builds the graph; no backward: no scores, so step 1 is magnitude only
    pm.on_step_end()
    state = pm.pruner.channel_graph
    # The block-internal channels of layer1.0 (conv1 -> bn -> act -> conv2): conv2 is their only consumer.
    group = next(i for i, g in enumerate(state.groups) if g.root == "layer1.0.conv1")
    off, n = state.layout[group]
    pruned = torch.nonzero(pm.pruner.pruned[off : off + n]).flatten() + off
    assert len(pruned) >= 2
    magnitude, _ = pm.pruner.filter_stats(~pm.pruner.pruned)
    b = int(pruned[torch.argmin(magnitude[pruned])])
    a = int(next(i for i in pruned if int(i) != b))
    (consumer,) = [name for name, index in state.in_maps.items() if bool((index == a).any())]
    channel_a = int(torch.nonzero(state.in_maps[consumer] == a)[0])
    kept_channels = torch.nonzero(~pm.pruner.pruned[state.in_maps[consumer].clamp_max(state.total - 1)]).flatten()
    seen = {}
    handle = state.modules[consumer].register_forward_hook(lambda m, args, out: seen.update(x=args[0]))
    pm(x)
    handle.remove()
    gated = seen["x"]
    assert float(gated[:, channel_a].detach().abs().max()) == 0.0  # soft-pruned: the consumer sees zeros
    # Restoring `a` would lower this loss a lot; the kept channels give the reference scores.
    loss = -100.0 * gated[:, channel_a].sum() + 1e-3 * gated[:, kept_channels].sum()
    loss.backward()
    logs = pm.on_step_end()
    return pm, a, b, logs


def test_protective_rule_restores_a_pruned_filter_with_large_gradient() -> None:
    pm, a, b, logs = _gradient_on_one_filter(protect=0.9)
    assert not bool(pm.pruner.pruned[a])  # restored
    assert bool(pm.pruner.pruned[b])  # no gradient: stays pruned
    assert logs["psap/restored"] >= 1 and pm.pruner.last_plan["protected"][a]
    assert not pm.pruner.last_plan["protected"][b]


def test_without_the_protective_rule_the_filter_stays_pruned() -> None:
    pm, a, b, logs = _gradient_on_one_filter(protect=None)
    assert bool(pm.pruner.pruned[a]) and bool(pm.pruner.pruned[b])
    assert logs["psap/restored"] == 0


# ---------------------------------------------------------------------------- train, prune, save, load
@pytest.mark.parametrize("name", list(ARCHS))
def test_train_prune_save_load(name: str, tmp_path: Path) -> None:
    pm = make(name, sparsity=0.4, prune_every=2, prune_steps=3, score_steps=2)
    dense_params = sum(p.numel() for p in pm.parameters())
    logs = [entry for entry in train(pm, 7) if entry]
    assert [entry["psap/prune_step"] for entry in logs] == [1, 2, 3]
    total = pm.pruner.channel_graph.total
    assert int(pm.pruner.pruned.sum()) == round(0.4 * total)
    x, _ = data(4, seed=5)
    pm.eval()
    with torch.no_grad():
        soft = pm(x)
    report = pm.prune()
    # Physically narrower: fewer parameters and FLOPs, every group keeps a filter, and the narrowed model computes
    # what the soft-pruned one did (channels that feed only convs / linears).
    assert report.params_after < report.params_before == dense_params
    assert report.flops_after < report.flops_before and report.flops_after == measure_flops(pm.model, x)
    assert report.filters_after == total - round(0.4 * total)
    assert all(1 <= row["kept"] < row["channels"] or row["kept"] == row["channels"] for row in report.groups)
    assert sum(row["kept"] for row in report.groups) < sum(row["channels"] for row in report.groups)
    with torch.no_grad():
        hard = pm(x)
    assert hard.shape == (4, 10) and torch.isfinite(hard).all()
    if name != "test_convnext":  # ConvNeXt's LayerNorms see the soft-pruned residual channels until removal
        torch.testing.assert_close(hard, soft, rtol=1e-4, atol=1e-4)
    assert "filters" in str(report) and "restored" in str(report)

    pm.save_pretrained(tmp_path, model_args=ARCHS[name] or None)
    saved = json.loads((tmp_path / "pruning_config.json").read_text())
    assert saved["config"]["method"] == "psap" and saved["structure"]["modules"]
    loaded = timm_prune.from_pretrained(tmp_path)
    assert sum(p.numel() for p in loaded.parameters()) == report.params_after
    assert loaded.last_report.flops_after == report.flops_after
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), hard, rtol=0, atol=1e-6)


def test_flops_target_is_met_and_too_low_a_target_fails() -> None:
    pm = make(flops_target=0.4, prune_every=1, prune_steps=2)
    logs = [entry for entry in train(pm, 2) if entry]
    assert logs[0]["psap/flops_ratio"] > logs[1]["psap/flops_ratio"]  # the budget tightens step by step
    report = pm.prune()
    assert 0.98 * report.target_flops <= report.flops_after <= report.target_flops
    assert report.flops_ratio == pytest.approx(0.4, abs=0.01)
    pm = make(flops_target=0.01, prune_every=1, prune_steps=1)
    with pytest.raises(ValueError, match="PruneConfig.flops_target 0.01 .* below what max_ratio"):
        pm(data()[0])  # the first forward already knows


def test_early_prune_runs_the_rest_of_the_schedule_and_state_round_trips() -> None:
    pm = make(sparsity=0.5, prune_every=2, prune_steps=4)
    train(pm, 3)  # one pruning step of four
    assert int(pm.pruner.prune_step) == 1
    # A checkpoint taken mid-schedule comes back into a fresh model before its first forward.
    fresh = make(sparsity=0.5, prune_every=2, prune_steps=4)
    fresh.load_state_dict(pm.state_dict())
    assert torch.equal(fresh.pruner.pruned, pm.pruner.pruned) and int(fresh.pruner.step) == 3
    x, _ = data(2)
    pm.eval(), fresh.eval()
    with torch.no_grad():
        torch.testing.assert_close(fresh(x), pm(x), rtol=0, atol=0)
    with pytest.warns(UserWarning, match="1 of 4 pruning steps"):
        report = pm.prune()
    assert report.filters_after == report.filters_before - round(0.5 * report.filters_before)


def test_resume_mid_schedule_reaches_the_uninterrupted_weights() -> None:
    # Pruning at steps 4 and 8, scores from steps 2-4 and 6-8: the checkpoint after step 6 is inside a window.
    def run(steps: int, state: dict | None = None) -> tuple[timm_prune.PrunableModel, torch.optim.Optimizer]:
        pm = make(sparsity=0.5, prune_every=4, prune_steps=2, score_steps=3)
        optimizer = torch.optim.SGD(pm.parameters(), lr=0.05, momentum=0.9)
        if state is not None:
            pm.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
        pm.train()
        for i in range(steps):
            x, y = data(seed=10 + i + (0 if state is None else state["done"]))
            F.cross_entropy(pm(x), y).backward()
            optimizer.step()
            pm.on_step_end()
            optimizer.zero_grad()
        return pm, optimizer

    full, _ = run(9)
    first, optimizer = run(6)
    assert int(first.pruner.score_count) == 1  # scores in flight travel with the checkpoint
    state = {"model": first.state_dict(), "optimizer": optimizer.state_dict(), "done": 6}
    resumed, _ = run(3, state)
    assert int(full.pruner.prune_step) == int(resumed.pruner.prune_step) == 2
    assert torch.equal(full.pruner.pruned, resumed.pruner.pruned)
    assert int(full.pruner.restored_total) == int(resumed.pruner.restored_total)
    for (key, a), b in zip(full.model.state_dict().items(), resumed.model.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=0, msg=key)


def test_auto_prune_every_needs_total_steps() -> None:
    pm = make(sparsity=0.3, prune_steps=2)
    pm(data()[0])
    with pytest.raises(ValueError, match="prune_every"):
        pm.on_step_end()
    pm.on_step_end(total_steps=8)  # 75% of 8 steps over 2 pruning steps: one every 3
    assert int(pm.pruner.prune_step) == 0
    pm.on_step_end(total_steps=8)
    assert int(pm.pruner.prune_step) == 1


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flops_target", 1),
        ("flops_target", -0.2),
        ("prune_every", 0),
        ("prune_steps", 1.5),
        ("schedule", "exponential"),
        ("zero_threshold", 0),
        ("adaptivity", -1),
        ("max_ratio", 1.0),
        ("protect", 1.0),
        ("score_steps", 0),
        ("input_size", [3, 32]),
        ("latency_runs", -1),
    ],
)
def test_config_errors_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"PruneConfig.{field}"):
        timm_prune.PruneConfig(method="psap", **{field: value})


def test_config_round_trip_and_sparsity_above_max_ratio() -> None:
    config = timm_prune.PruneConfig(method="psap", sparsity=0.6, prune_every=50, protect=None, schedule="linear")
    assert timm_prune.PruneConfig.from_json(config.to_json()) == config
    assert timm_prune.PruneConfig(method="psap", protect=False).protect is None  # `--protect false` in recipes
    with pytest.raises(ValueError, match="PruneConfig.sparsity .* max_ratio"):
        timm_prune.convert(timm.create_model("test_resnet"), method="psap", sparsity=0.8, max_ratio=0.7)


# ---------------------------------------------------------------------------- the recipe
def test_recipe_runs_psap_end_to_end(tmp_path: Path) -> None:
    out = tmp_path / "psap"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_DATASETS_OFFLINE="1", HF_HOME=str(tmp_path / "hf"), OMP_NUM_THREADS="1")
    env.update(ACCELERATE_USE_CPU="1")
    flags = ["--model", "test_resnet", "--img_size", "16", "--batch_size", "16", "--max_train_samples", "64"]
    flags += ["--max_eval_samples", "32", "--num_workers", "0", "--bn_batches", "2", "--method", "psap"]
    flags += ["--sparsity", "0.5", "--prune_steps", "2", "--max_train_steps", "6", "--latency_runs", "0"]
    flags += ["--report_to", "jsonl", "--output_dir", str(out)]
    launcher = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(REPO / "recipes" / "train.py")]
    result = subprocess.run([*command, *flags], cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stderr[-4000:]
    assert "psap at 0.5 of the filters" in result.stdout and "gates:" not in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    report = metrics["prune_report"]
    # Auto schedule: 2 pruning steps within the first 75% of the 6 steps (steps 2 and 4), exact filter count.
    assert report["filters_after"] == report["filters_before"] - round(0.5 * report["filters_before"])
    assert metrics["final"]["flops_ratio"] < 0.6 and metrics["history"][-1]["psap/pruned_fraction"] == 0.5
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in logged if "psap/prune_step" in r and "epoch" not in r] == [2, 4]
    loaded = timm_prune.from_pretrained(str(out))
    dense = timm.create_model("test_resnet", num_classes=10)
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters())
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_failed_removal_leaves_the_soft_pruned_model_unchanged(monkeypatch) -> None:
    import timm_prune.methods.structured_base as base_module

    pm = make(sparsity=0.5, prune_every=1, prune_steps=1)
    train(pm, 2)
    x, _ = data(2)
    pm.eval()
    with torch.no_grad():
        before_out = pm(x)
    before_state = {k: v.clone() for k, v in pm.state_dict().items()}
    real_remove = base_module.remove_channels

    def remove_then_fail(state, keep, method):
        real_remove(state, keep, method)  # every group already narrowed: the hardest case to undo
        raise RuntimeError("simulated failure after removal")

    monkeypatch.setattr(base_module, "remove_channels", remove_then_fail)
    with pytest.raises(timm_prune.StructuredPruneError, match="simulated failure.*left unchanged"):
        pm.prune()
    after_state = pm.state_dict()
    assert after_state.keys() == before_state.keys()
    assert all(torch.equal(after_state[k], v) for k, v in before_state.items())
    with torch.no_grad():
        torch.testing.assert_close(pm(x), before_out, rtol=0, atol=0)  # still soft-pruned through its gates
    monkeypatch.setattr(base_module, "remove_channels", real_remove)
    report = pm.prune()  # and it can still be pruned for real
    assert report.params_after < report.params_before
    with torch.no_grad():
        torch.testing.assert_close(pm(x), before_out, rtol=1e-4, atol=1e-5)
