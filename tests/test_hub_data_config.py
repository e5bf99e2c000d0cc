"""The saved ``pretrained_cfg`` records what the model was trained with (issue 16, item 1): stock timm's
``resolve_data_config``, transformers' image processor for timm models and ``timm-prune eval`` all read the
training resolution, normalisation and label names back with no flag; a model trained from scratch names no
ImageNet checkpoint."""

from __future__ import annotations

import json
import os

import huggingface_hub
import pytest
import timm
import torch
from PIL import Image
from timm.data import resolve_data_config

import timm_prune
from timm_prune.cli import main as cli_main

DATA_CONFIG = {
    "input_size": (3, 16, 16),
    "interpolation": "bilinear",
    "mean": (0.5, 0.5, 0.5),
    "std": (0.25, 0.25, 0.25),
    "crop_pct": 1.0,
    "crop_mode": "center",
}
LABELS = [str(i) for i in range(10)]


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("resnet10t", num_classes=10)  # pretrained_cfg: an ImageNet tag at 176 px
    pm = timm_prune.convert(model, timm_prune.PruneConfig(method="pof", sparsity=0.5))
    pm.prune()
    path = str(tmp_path_factory.mktemp("dc") / "model")
    pm.save_pretrained(path, data_config=DATA_CONFIG, label_names=LABELS, pretrained=False)
    return path


def test_config_json_holds_the_training_data_config(saved):
    config = json.load(open(os.path.join(saved, "config.json")))
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["interpolation"] == "bilinear" and cfg["crop_pct"] == 1.0
    assert cfg["mean"] == [0.5] * 3 and cfg["std"] == [0.25] * 3 and cfg["num_classes"] == 10
    assert "test_input_size" not in cfg and "test_crop_pct" not in cfg  # the ImageNet recipe's test settings
    assert config["label_names"] == LABELS
    # Trained from scratch: no checkpoint tag, licence or source of weights it never used.
    assert not {"tag", "hf_hub_id", "url", "license", "origin_url"} & set(cfg)
    assert json.load(open(os.path.join(saved, "pruning_config.json")))["base_model"] is None


def test_stock_timm_resolves_the_training_data_config(saved):
    stock = timm.create_model(f"local-dir:{saved}", pretrained=True)
    resolved = resolve_data_config({}, model=stock)
    assert resolved["input_size"] == (3, 16, 16) and resolved["interpolation"] == "bilinear"
    assert tuple(resolved["mean"]) == (0.5, 0.5, 0.5) and tuple(resolved["std"]) == (0.25, 0.25, 0.25)
    assert stock.pretrained_cfg["label_names"] == LABELS  # timm moves them into pretrained_cfg on load
    loaded = timm_prune.from_pretrained(saved)
    assert resolve_data_config({}, model=loaded.model)["input_size"] == (3, 16, 16)


def test_transformers_reads_the_data_config_and_labels(saved):
    from transformers import AutoConfig, AutoImageProcessor

    processor = AutoImageProcessor.from_pretrained(saved)
    assert tuple(processor.data_config["input_size"]) == (3, 16, 16)
    assert tuple(processor.data_config["mean"]) == (0.5, 0.5, 0.5)
    pixels = processor(Image.new("RGB", (40, 40)), return_tensors="pt")["pixel_values"]
    assert tuple(pixels.shape) == (1, 3, 16, 16)
    assert AutoConfig.from_pretrained(saved).id2label[3] == "3"


def test_eval_uses_the_saved_resolution_with_no_flag(saved, capsys):
    assert cli_main(["eval", saved, "--dataset", "digits", "--limit", "20"]) == 0
    assert "at 16x16" in capsys.readouterr().out


def test_defaults_keep_the_architecture_config(tmp_path):
    # Without a data config the model's own pretrained_cfg is written, and base_model is its Hub id.
    model = timm.create_model("resnet10t", num_classes=10)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(method="pof", sparsity=0.5))
    pm.save_pretrained(tmp_path / "m", label_names=["a", "b"])  # not one per class: ignored
    config = json.load(open(tmp_path / "m" / "config.json"))
    assert config["pretrained_cfg"]["input_size"] == [3, 176, 176] and "label_names" not in config
    assert json.load(open(tmp_path / "m" / "pruning_config.json"))["base_model"] == "timm/resnet10t.c3_in1k"
