"""AutoBot: gate training, exact FLOPs selection, physical channel removal, report, save -> from_pretrained."""

from __future__ import annotations

import json

import pytest
import timm
import torch
import torch.nn as nn
from torch.utils.flop_counter import FlopCounterMode

import timm_prune
from timm_prune import StructuredReport
from timm_prune.structured.measure import measure_flops

# Tiny tensors on 2 shared cores: one intra-op thread is much faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


# Different families: plain residual, inverted residual + SE, depthwise + LayerNorm2d, grouped convs,
# concatenations, hard-swish mobile, ViT, BYOB, re-param VGG, HGNet, conv + attention hybrids (MobileViT,
# EfficientViT, EdgeNeXt): (create_model kwargs, input size).
ARCHS = {
    "test_resnet": ({}, 32),
    "test_efficientnet": ({}, 32),
    "test_convnext": ({}, 32),
    "regnetx_002": ({}, 32),
    "regnety_002": ({}, 32),
    "densenet121": ({"growth_rate": 8}, 32),
    "mobilenetv3_small_050": ({}, 32),
    "test_vit": ({"img_size": 32}, 32),
    "test_byobnet": ({}, 32),
    "repvgg_a0": ({}, 32),
    "hgnetv2_b0": ({}, 32),
    "mobilevit_xxs": ({}, 64),
    "efficientvit_b0": ({"depths": (1, 1, 1, 1, 1)}, 64),
    "edgenext_xx_small": ({}, 64),
    # Swin: PatchMerging folds 2x2 positions into 4C channels (a module rule narrows it); V2 blocks also record
    # num_heads; V2-CR's window attention does not narrow its stream consistently (those groups stay whole).
    "swin_tiny_patch4_window7_224": (
        {"img_size": 64, "embed_dim": 24, "depths": (1, 1, 2, 1), "num_heads": (1, 2, 4, 8), "window_size": 2},
        64,
    ),
    "swinv2_tiny_window8_256": (
        {"img_size": 64, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 2},
        64,
    ),
    "swinv2_cr_tiny_ns_224": (
        {"img_size": 64, "embed_dim": 24, "depths": (1, 1, 1, 1), "num_heads": (1, 2, 4, 8), "window_size": 2},
        64,
    ),
    "poolformer_s12": ({}, 32),  # MetaFormer Scale keeps a view shape of its parameter
    "levit_128s": ({"img_size": 64}, 64),  # uneven q/k/v splits, cached attention biases
    "rexnet_100": ({}, 32),  # partial-channel residual adds: torch-pruning's group search is bounded
    "ghostnet_050": ({}, 32),  # groups torch-pruning narrows other than planned stay whole
    "test_mambaout": ({}, 32),  # gated conv MLPs (formerly caught by the plan check)
    "fastvit_t8": ({}, 64),  # grouped convs with a channel multiplier, re-param branches
    "pit_ti_224": ({"img_size": 64}, 64),  # pooling-based ViT: an expanded cls token under FlopCounterMode
}


def make(name: str, **config) -> timm_prune.PrunableModel:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=10, **ARCHS.get(name, ({}, 32))[0]).eval()
    config.setdefault("latency_runs", 2)
    return timm_prune.convert(model, method="autobot", **config)


def batches(n: int = 12, labeled: bool = True, size: int = 32) -> list:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(8, 3, size, size, generator=g)
    y = torch.randint(0, 10, (8,), generator=g)
    return [(x, y) if labeled else x] * n


def target_channels(pm: timm_prune.PrunableModel) -> dict[str, int]:
    return {n: (m.out_features if isinstance(m, nn.Linear) else m.out_channels) for n, m in pm.targets.items()}


@pytest.mark.parametrize("name", list(ARCHS))
def test_train_prune_save_load(name: str, tmp_path) -> None:
    kwargs, size = ARCHS[name]
    pm = make(name, flops_target=0.5)
    before_channels = target_channels(pm)
    history = pm.calibrate(batches(size=size), lr=0.5)
    # Gates train: the loss goes down and the gates leave their initial value.
    assert history["loss"][-1] < history["loss"][0]
    assert (pm.pruner.gates() - 0.9).abs().max() > 0.05
    counter = pm.pruner.channel_graph.flops
    keep, _ = pm.pruner.plan()
    planned = counter.keep_flops(keep)

    report = pm.prune()
    assert isinstance(report, StructuredReport) and pm.last_report is report
    x = batches(1, size=size)[0][0]
    # FLOPs of the pruned model, counted independently, meet the target within 2% (and never exceed it).
    measured = measure_flops(pm.model, x)
    assert measured == report.flops_after == pytest.approx(planned)
    assert report.flops_before == measure_flops(timm.create_model(name, num_classes=10, **kwargs).eval(), x)
    assert 0.98 * report.target_flops <= report.flops_after <= report.target_flops
    assert report.flops_ratio == pytest.approx(0.5, abs=0.01)
    # Physically narrower, and runs.
    after_channels = target_channels(pm)
    assert sum(after_channels.values()) < sum(before_channels.values())
    assert all(after_channels[n] >= 1 for n in after_channels)
    assert report.params_after < report.params_before
    assert sum(p.numel() for p in pm.parameters() if p is not None) < report.params_before + 1
    assert report.latency_ms_before > 0 and report.latency_ms_after > 0
    assert all(1 <= row["kept"] <= row["channels"] for row in report.groups)
    pm.eval()
    out = pm(x)
    assert out.shape == (8, 10) and torch.isfinite(out).all()

    # save -> from_pretrained rebuilds the narrowed architecture and reproduces the outputs exactly.
    pm.save_pretrained(tmp_path, model_args=kwargs or None)
    saved = json.loads((tmp_path / "pruning_config.json").read_text())
    assert saved["structure"]["modules"] and saved["report"]["kind"] == "structured"
    card = (tmp_path / "README.md").read_text()
    assert "whole channels removed" in card and "MFLOPs" in card
    assert 'timm.create_model("hf-hub:' not in card  # stock timm cannot rebuild the narrowed model
    # Structured cards show channels kept per group (not an empty sparsity table) and the speed-up.
    first = report.groups[0]
    assert f"| `{first['root']}` | {first['channels']} | {first['kept']} |" in card
    assert "Channels kept per group" in card and "Per-layer sparsity" not in card and "speed-up x" in card
    assert (tmp_path / "pruning_plot.png").stat().st_size > 10_000
    loaded = timm_prune.from_pretrained(tmp_path)
    assert isinstance(loaded.last_report, StructuredReport)
    assert loaded.last_report.flops_after == report.flops_after
    assert {k: v.shape for k, v in loaded.model.state_dict().items()} == {
        k: v.shape for k, v in pm.model.state_dict().items()
    }
    torch.testing.assert_close(loaded(x), out, rtol=0, atol=1e-6)


@pytest.mark.parametrize("name", ["test_resnet", "test_efficientnet", "densenet121", "regnetx_002"])
def test_flops_count_matches_flop_counter_mode(name: str) -> None:
    pm = make(name)
    pm.calibrate(batches(1), num_batches=1)
    counter = pm.pruner.channel_graph.flops
    x = batches(1)[0][0][:1]
    reference = FlopCounterMode(display=False)
    with torch.no_grad(), reference:
        pm.model(x)
    # CNNs: convs and linears are everything FlopCounterMode counts, so the gated count alone must match it.
    dense = counter.count(torch.ones(counter.total, dtype=torch.float64))
    assert float(dense) == reference.get_total_flops()
    assert counter.rest == 0
    # And it is differentiable in the gates, every gate moving the count.
    gates = torch.full((counter.total,), 0.5, dtype=torch.float64, requires_grad=True)
    counter.count(gates).backward()
    assert (gates.grad > 0).all()


def test_vit_attention_flops_are_the_constant_rest() -> None:
    pm = make("test_vit")
    for module in pm.model.modules():
        if hasattr(module, "fused_attn"):
            module.fused_attn = False  # explicit q @ k^T and attn @ v, which FlopCounterMode counts
    pm.calibrate(batches(1), num_batches=1)
    counter = pm.pruner.channel_graph.flops
    blocks = pm.model.blocks
    tokens = pm.model.patch_embed.num_patches + pm.model.num_prefix_tokens
    dim = blocks[0].attn.num_heads * blocks[0].attn.head_dim
    # Two matmuls per block, each tokens x tokens x dim MACs: 2 FLOPs per MAC.
    assert counter.rest == len(blocks) * 2 * 2 * tokens * tokens * dim
    assert counter.dense == measure_flops(pm.model, batches(1)[0][0])
    pm.prune()
    assert pm.last_report.flops_after <= pm.last_report.target_flops
    # Head counts never change: the q/k/v outputs stay whole, the MLPs narrow.
    assert all(b.attn.qkv.out_features == 3 * dim for b in blocks)
    assert sum(b.mlp.fc1.out_features for b in blocks) < sum(4 * dim for _ in blocks)


def test_unlabeled_batches_absolute_target_and_state_restored() -> None:
    pm = make("test_resnet", flops_target=0.5, latency_runs=0)
    pm.calibrate(batches(1), num_batches=1)
    dense = pm.pruner.channel_graph.flops.dense
    pm = make("test_resnet", flops_target=0.4 * dense / 1e6, latency_runs=0)  # absolute MFLOPs
    pm.model.train()
    weights = {k: v.clone() for k, v in pm.model.state_dict().items()}
    history = pm.calibrate(batches(6, labeled=False), num_batches=4)
    assert len(history["loss"]) == 4
    # Weights untouched, trainable again, training mode restored; only the gates moved.
    for k, v in pm.model.state_dict().items():
        torch.testing.assert_close(v, weights[k], rtol=0, atol=0)
    assert all(p.requires_grad for p in pm.model.parameters())
    assert pm.model.training
    report = pm.prune()
    assert report.latency_ms_before is None
    assert report.flops_after <= 0.4 * dense and report.flops_after >= 0.98 * 0.4 * dense
    json.dumps(report.to_dict())
    text = str(report)
    assert "FLOPs" in text and "layer4" in text


def test_at_least_one_channel_per_group_and_target_too_low() -> None:
    pm = make("test_efficientnet", flops_target=0.05, latency_runs=0)
    pm.calibrate(batches(2), num_batches=2)
    with pytest.raises(ValueError, match="flops_target.*one channel per group"):
        pm.prune()
    pm = make("test_efficientnet", flops_target=0.2, latency_runs=0)
    pm.calibrate(batches(2), num_batches=2)
    report = pm.prune()
    assert min(row["kept"] for row in report.groups) >= 1
    assert report.flops_after <= report.target_flops


def test_prune_needs_trained_gates() -> None:
    pm = make("test_resnet")
    with pytest.raises(RuntimeError, match="calibrate"):
        pm.prune()


def _model_state(model: nn.Module) -> tuple:
    """Everything a failed prune() must leave as it was: tensors, parameter objects, module attributes."""
    tensors = {k: v.clone() for k, v in model.state_dict().items()}
    params = [id(p) for p in model.parameters()]
    attrs = {name: {k: v for k, v in vars(m).items() if not k.startswith("_")} for name, m in model.named_modules()}
    return tensors, params, attrs


@pytest.mark.parametrize(
    ("name", "match"),
    [
        ("ghostnet_050", "output channels after pruning"),  # torch-pruning narrows layers other than planned
        ("swinv2_cr_tiny_ns_224", r"no longer runs: stages\.\d\.blocks\.0\.attn \(WindowMultiHeadAttention\)"),
    ],
)
def test_failed_removal_leaves_the_model_unchanged(name: str, match: str, monkeypatch) -> None:
    from timm_prune.structured import StructuredPruneError, graph

    # Without the trial removal, these models keep groups torch-pruning cannot remove: prune() must fail cleanly.
    monkeypatch.setattr(
        graph, "drop_unremovable_groups", lambda model, graph, groups, handlers, x: (groups, handlers, [])
    )
    kwargs, size = ARCHS[name]
    pm = make(name, flops_target=0.5, latency_runs=0)
    x = batches(1, size=size)[0][0]
    pm.calibrate(batches(2, size=size), num_batches=2)
    pm.model.train()
    before = _model_state(pm.model)
    dense = pm.model.eval()(x)
    pm.model.train()
    with pytest.raises(StructuredPruneError, match=match) as info:
        pm.prune()
    assert "left unchanged" in str(info.value)
    tensors, params, attrs = _model_state(pm.model)
    assert params == before[1] and attrs == before[2] and pm.model.training
    assert tensors.keys() == before[0].keys()
    for key, value in tensors.items():
        torch.testing.assert_close(value, before[0][key], rtol=0, atol=0)
    torch.testing.assert_close(pm.model.eval()(x), dense, rtol=0, atol=0)
    # The restored model is prunable again with the same graph once the bad groups are left out.
    monkeypatch.undo()
    pm = make(name, flops_target=0.5, latency_runs=0)
    with pytest.warns(UserWarning, match="stay whole"):
        pm.calibrate(batches(2, size=size), num_batches=2)
    assert pm.prune().flops_after <= pm.last_report.target_flops


def test_group_search_is_bounded() -> None:
    import time

    import torch_pruning as tp

    from timm_prune.structured.groups import GroupSearchOverflow, all_groups, bounded_group_search

    model = timm.create_model("rexnet_100", num_classes=10).eval()
    graph = tp.DependencyGraph().build_dependency(model, example_inputs=torch.randn(1, 3, 32, 32))
    start = time.perf_counter()
    # ReXNet's stage streams (x[:, :c] += shortcut) never settle in torch-pruning: the search stops quickly ...
    root = model.features[15].conv_pwl.conv  # the stream of the last stage
    with pytest.raises(GroupSearchOverflow, match="did not settle"), bounded_group_search(len(graph.module2node)):
        graph.get_pruning_group(root, tp.prune_conv_out_channels, list(range(root.out_channels)))
    # ... and the other groups are still found, the unsettled ones left whole.
    groups, unsettled = all_groups(graph, [], (nn.Conv2d, nn.Linear))
    assert unsettled >= 1 and len(groups) >= 10
    assert time.perf_counter() - start < 30
    # Everything is restored: torch-pruning's own Group works unbounded again.
    from torch_pruning.dependency.group import Group

    assert Group.add_dep.__qualname__ == "Group.add_dep"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("flops_target", 0),
        ("flops_target", 1),
        ("flops_target", -0.5),
        ("beta", -1),
        ("gamma", float("nan")),
        ("gate_lr", 0),
        ("num_batches", 0),
        ("gate_batch_size", 2.5),
        ("gate_init", 1.0),
        ("input_size", [3, 32]),
        ("latency_runs", -1),
    ],
)
def test_config_errors_name_the_field(field: str, value) -> None:
    with pytest.raises(ValueError, match=f"PruneConfig.{field}"):
        timm_prune.PruneConfig(method="autobot", **{field: value})


def test_config_round_trip() -> None:
    config = timm_prune.PruneConfig(method="autobot", flops_target=0.3, beta=4.0, input_size=[3, 32, 32])
    assert timm_prune.PruneConfig.from_json(config.to_json()) == config
    assert config.gate_init == 0.9 and config.num_batches == 200 and config.gate_batch_size == 64


def test_gates_leave_no_trace_before_prune() -> None:
    pm = make("test_resnet")
    x = batches(1)[0][0]
    dense = pm(x)
    pm.calibrate(batches(3), num_batches=3)
    # Gate hooks are gone after training: the model computes exactly what it did.
    torch.testing.assert_close(pm(x), dense, rtol=0, atol=0)
    # A pruned model needs new gates before pruning again (the old ones describe the dense model).
    pm.prune()
    with pytest.raises(RuntimeError, match="untrained"):
        pm.prune()


def test_tampered_structure_is_a_file_format_error(tmp_path) -> None:
    from timm_prune.hub import FileFormatError

    pm = make("test_resnet", latency_runs=0)
    pm.calibrate(batches(2), num_batches=2)
    pm.prune()
    pm.save_pretrained(tmp_path)
    path = tmp_path / "pruning_config.json"
    data = json.loads(path.read_text())
    data["structure"]["tensors"]["no.such.weight"] = [1]
    path.write_text(json.dumps(data))
    with pytest.raises(FileFormatError, match="structure"):
        timm_prune.from_pretrained(tmp_path)


def test_no_penalty_and_no_candidate_energy_while_weights_train() -> None:
    pm = make("test_resnet")
    assert pm.penalty().item() == 0.0
    assert pm.candidate_energy() == {}  # channels are chosen by gates later, not by a candidate set


def test_flops_loss_is_normalised_on_both_sides_of_the_target() -> None:
    from timm_prune.methods.autobot import flops_loss

    ratios = torch.tensor([0.0, 0.15, 0.3, 0.65, 1.0], dtype=torch.float64, requires_grad=True)
    loss = flops_loss(ratios, 0.3)
    # 1 at 0 FLOPs and at the dense model, 0 at the target, linear on each side (the authors' normalisation).
    torch.testing.assert_close(loss, torch.tensor([1.0, 0.5, 0.0, 0.5, 1.0], dtype=torch.float64))
    loss.sum().backward()
    torch.testing.assert_close(ratios.grad[[1, 3]], torch.tensor([-1 / 0.3, 1 / 0.7], dtype=torch.float64))


def test_swin_patch_merging_narrows_with_its_stage() -> None:
    name = "swin_tiny_patch4_window7_224"
    kwargs, size = ARCHS[name]
    pm = make(name, flops_target=0.4, latency_runs=0)
    pm.calibrate(batches(4, size=size), num_batches=4)
    # The stage streams that enter PatchMerging are groups (their 4C fold maps channel c to k * C + c) ...
    folded = [g for g in pm.pruner.groups if any(n.endswith("downsample.reduction") for n, _, _ in g.inputs)]
    assert len(folded) >= 2
    entry = next(e for e in folded[0].inputs if e[0].endswith("downsample.reduction"))
    channels = len(entry[1]) // 4
    assert entry[1][channels:] == [c + channels for c in entry[1][: len(entry[1]) - channels]]
    dense = [pm.model.layers[i].downsample.dim for i in (1, 2, 3)]
    pm.prune()
    # ... and narrow with it: the merge's norm and reduction follow the stream of the stage before.
    for i in (1, 2, 3):
        merge, stream = pm.model.layers[i].downsample, pm.model.layers[i - 1].blocks[-1].mlp.fc2.out_features
        assert merge.reduction.in_features == 4 * stream == merge.norm.normalized_shape[0] and merge.dim == stream
    assert any(pm.model.layers[i].downsample.dim < d for i, d in zip((1, 2, 3), dense, strict=True))


def test_torch_pruning_failing_midway_leaves_the_model_unchanged() -> None:
    from timm_prune.structured import StructuredPruneError

    pm = make("test_convnext", flops_target=0.5, latency_runs=0)
    x = batches(1)[0][0]
    pm.calibrate(batches(3), num_batches=3)
    before = _model_state(pm.model)
    dense = pm(x)
    graph = pm.pruner.channel_graph.graph
    calls = {"n": 0}
    original = graph.get_pruning_group

    def flaky(*args, **kwargs):  # the third group fails after two were removed: a half-pruned model
        calls["n"] += 1
        if calls["n"] == 3:
            raise AssertionError("simulated torch-pruning failure")
        return original(*args, **kwargs)

    graph.get_pruning_group = flaky
    with pytest.raises(StructuredPruneError, match="simulated torch-pruning failure.*left unchanged"):
        pm.prune()
    assert calls["n"] == 3
    tensors, params, attrs = _model_state(pm.model)
    assert params == before[1] and attrs == before[2]
    for key, value in tensors.items():
        torch.testing.assert_close(value, before[0][key], rtol=0, atol=0)
    torch.testing.assert_close(pm(x), dense, rtol=0, atol=0)
    # The same graph and gates prune the restored model once torch-pruning behaves.
    graph.get_pruning_group = original
    report = pm.prune()
    assert 0.98 * report.target_flops <= report.flops_after <= report.target_flops
