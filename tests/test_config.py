"""PruneConfig validation and JSON round trip; module targeting and its errors."""

from __future__ import annotations

import json

import pytest
import timm
import torch.nn as nn

import timm_prune
from timm_prune.targets import find_targets


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"sparsity": 1.0}, "sparsity"),
        ({"sparsity": -0.1}, "sparsity"),
        ({"sparsity": "0.5"}, "sparsity"),
        ({"scope": "model"}, "scope"),
        ({"method": "magic"}, "method"),
        ({"recovery": "median"}, "recovery"),
        ({"penalty_weight": -1.0}, "penalty_weight"),
        ({"target_modules": 3}, "target_modules"),
        ({"exclude_modules": [1, 2]}, "exclude_modules"),
        ({"penalty_warmup": -5}, "penalty_warmup"),
        ({"threshold_refresh": 0}, "threshold_refresh"),
        ({"penalty_every": 0}, "penalty_every"),
        ({"penalty_every": 1.5}, "penalty_every"),
        ({"candidate_decay": 1.0}, "candidate_decay"),
        ({"candidate_decay": -0.01}, "candidate_decay"),
        ({"criterion": "random"}, "criterion"),
        ({"penalty_sparsities": [0.5, 1.0]}, "penalty_sparsities"),
        ({"penalty_sparsities": []}, "penalty_sparsities"),
        ({"penalty_sparsities": 0.5}, "penalty_sparsities"),
        ({"threshold_sample": -1}, "threshold_sample"),
        ({"not_a_field": 1}, "not_a_field"),
    ],
)
def test_invalid_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        timm_prune.PruneConfig(**kwargs)


def test_config_json_round_trip(tmp_path):
    config = timm_prune.PruneConfig(
        sparsity=0.7, scope="global", target_modules=["qkv", "fc1"], penalty_weight=5.0, penalty_warmup=100
    )
    path = tmp_path / "cfg.json"
    config.to_json(path)
    data = json.loads(path.read_text())
    assert data["sparsity"] == 0.7 and data["penalty_warmup"] == 100 and data["method"] == "pof"
    again = timm_prune.PruneConfig.from_json(path)
    assert again == config
    assert again.penalty_warmup == 100
    assert timm_prune.PruneConfig.from_dict(config.to_dict()) == config
    assert config != timm_prune.PruneConfig(sparsity=0.7)


def test_penalty_weight_defaults_to_the_method_default():
    assert timm_prune.PruneConfig().penalty_weight == 300.0  # POF's energy is a mean of fractions
    assert timm_prune.PruneConfig(method="slr").penalty_weight == 1.0
    assert timm_prune.PruneConfig(penalty_weight=2).penalty_weight == 2.0


def test_method_fields_read_as_attributes():
    config = timm_prune.PruneConfig(threshold_refresh=7)
    assert config.threshold_refresh == 7
    with pytest.raises(AttributeError, match="no field 'bogus'"):
        _ = config.bogus


def test_default_targets_skip_stem_and_classifier():
    model = timm.create_model("test_resnet", num_classes=3)
    targets = find_targets(model)
    stem, head = model.pretrained_cfg["first_conv"], model.pretrained_cfg["classifier"]
    assert stem not in targets and head not in targets
    convs_and_linears = [n for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))]
    assert sorted(targets) == sorted(set(convs_and_linears) - {stem, head})


def test_default_targets_skip_both_heads_of_distilled_vit():
    model = timm.create_model("deit_tiny_distilled_patch16_224", img_size=32, num_classes=3)
    targets = find_targets(model)
    assert "head" not in targets and "head_dist" not in targets and "patch_embed.proj" not in targets
    assert "blocks.0.attn.qkv" in targets and "blocks.11.mlp.fc2" in targets


def test_regex_and_suffix_targets():
    model = timm.create_model("test_vit", num_classes=3)
    by_regex = find_targets(model, target_modules=r"blocks\.\d+\.attn\.qkv")
    by_suffix = find_targets(model, target_modules=["qkv"])
    assert list(by_regex) == list(by_suffix) and len(by_regex) == len(model.blocks)
    excluded = find_targets(model, target_modules=["qkv", "proj"], exclude_modules=r"blocks\.0\..*")
    assert not any(n.startswith("blocks.0.") for n in excluded)
    assert "patch_embed.proj" in excluded  # explicitly asked for via the "proj" suffix


def test_nothing_matched_lists_existing_modules():
    model = timm.create_model("test_vit", num_classes=3)
    with pytest.raises(ValueError, match=r"matched nothing.*blocks\.0\.attn\.qkv"):
        find_targets(model, target_modules=["does_not_exist"])
    with pytest.raises(ValueError, match="No module to prune"):
        timm_prune.convert(model, timm_prune.PruneConfig(target_modules="nope.*"))


def test_unsupported_target_type_is_a_type_error():
    model = timm.create_model("test_vit", num_classes=3)
    with pytest.raises(TypeError, match=r"blocks\.0\.attn \(Attention\)"):
        find_targets(model, target_modules=["blocks.0.attn"])
    with pytest.raises(TypeError, match="LayerNorm"):
        find_targets(model, target_modules=["norm1"])


def test_weight_standardised_convs_left_out_by_default_and_flagged_when_targeted():
    model = timm.create_model("test_nfnet", num_classes=3)
    std_convs = [n for n, m in model.named_modules() if type(m).__name__.startswith("ScaledStdConv2d")]
    assert std_convs
    defaults = find_targets(model, exclude_modules=None)
    assert not set(std_convs) & set(defaults)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(sparsity=0.5, target_modules=std_convs[1:3]))
    report = pm.prune()
    assert all(layer.weight_transformed for layer in report.layers)
    assert "weight transformed in forward" in str(report)


def test_convert_twice_and_bad_arguments():
    model = timm.create_model("test_resnet", num_classes=3)
    pm = timm_prune.convert(model, sparsity=0.5)
    assert pm.config.sparsity == 0.5
    with pytest.raises(ValueError, match="already a PrunableModel"):
        timm_prune.convert(pm)
    with pytest.raises(ValueError, match="already parametrized"):
        timm_prune.convert(model)
    with pytest.raises(ValueError, match="not both"):
        timm_prune.convert(timm.create_model("test_resnet"), timm_prune.PruneConfig(), sparsity=0.2)
