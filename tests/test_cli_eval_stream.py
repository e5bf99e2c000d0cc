"""``timm-prune eval`` streams (issue 16, item 2): one batch decoded at a time with a progress bar, and
``--limit N`` a seeded random sample stratified by label, not the first N rows of a label-sorted split."""

from __future__ import annotations

import json

import huggingface_hub
import numpy as np
import pytest
import timm
import torch

import timm_prune
from timm_prune.cli import main as cli_main
from timm_prune.data import eval_loader, sample_indices


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_limit_is_a_seeded_stratified_sample():
    labels = np.repeat(np.arange(10), 100)  # sorted by label, as the local CIFAR-10 parquet is
    picked = sample_indices(labels, 100, seed=0)
    assert len(picked) == 100 and len(set(picked)) == 100 and list(picked) == sorted(picked)
    assert np.bincount(labels[picked], minlength=10).tolist() == [10] * 10  # every class its share
    assert np.array_equal(picked, sample_indices(labels, 100, seed=0))  # seeded
    assert not np.array_equal(picked, sample_indices(labels, 100, seed=1))
    assert np.array_equal(sample_indices(labels, None), np.arange(1000))
    uneven = np.array([0] * 900 + [1] * 100)
    assert np.bincount(uneven[sample_indices(uneven, 50)]).tolist() == [45, 5]  # proportional


def test_eval_streams_batches_and_never_loads_the_whole_split(tmp_path, monkeypatch, capsys):
    torch.manual_seed(0)
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=10), sparsity=0.3)
    pm.prune()
    path = str(pm.save_pretrained(tmp_path / "m"))

    def whole_split(*args, **kwargs):
        raise AssertionError("eval loaded the whole split into memory")

    monkeypatch.setattr("timm_prune.cli.load_eval_tensors", whole_split, raising=False)
    monkeypatch.setattr("timm_prune.data.load_eval_tensors", whole_split)
    args = ["eval", path, "--dataset", "digits", "--image-size", "16", "--limit", "50", "--batch-size", "8"]
    assert cli_main([*args, "--json"]) == 0
    captured = capsys.readouterr()
    results = json.loads(captured.out)["results"]
    assert all(r["total"] == 50 for r in results)
    assert "eval" in captured.err and "50/50" in captured.err  # the progress bar, on stderr

    loader, _ = eval_loader("digits", "test", 16, 3, (0.5,) * 3, (0.5,) * 3, limit=50, batch_size=8)
    assert isinstance(loader, torch.utils.data.DataLoader) and len(loader) == 7  # 50 images, batches of 8
    images, labels = next(iter(loader))
    assert images.shape == (8, 3, 16, 16) and labels.shape == (8,)
    counts = np.bincount(np.concatenate([y.numpy() for _, y in loader]), minlength=10)
    assert counts.min() >= 3  # every digit is in the sample
