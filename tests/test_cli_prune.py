"""``timm-prune prune``: one command from a saved (or Hub / named) timm model to a pruned, saved one."""

from __future__ import annotations

import os

import pytest
import timm
import torch
from timm.models._hub import save_for_hf

import timm_prune
from timm_prune.cli import main as cli_main
from timm_prune.oneshot.nm import is_nm


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10)
    path = tmp_path_factory.mktemp("plain") / "model"
    save_for_hf(model, str(path), safe_serialization=True)  # timm's own config.json + model.safetensors
    return str(path)


def test_prune_a_saved_timm_model_with_sparsegpt(plain_dir, tmp_path, capsys):
    out = str(tmp_path / "pruned")
    args = ["prune", plain_dir, "--method", "sparsegpt", "--sparsity", "0.5", "--dataset", "digits"]
    assert (
        cli_main([*args, "--calibration-batches", "2", "--batch-size", "8", "--image-size", "16", "--output", out]) == 0
    )
    assert "pruned " in capsys.readouterr().out
    pm = timm_prune.from_pretrained(out)
    assert pm.config.method == "sparsegpt" and pm.config.calibration_batches == 2 and pm.config.scope == "layer"
    assert pm.last_report.sparsity == pytest.approx(0.5, abs=0.02)
    assert pm.base_model == plain_dir and pm.metrics["calibration_images"] == 16
    # Stock timm reads the result, with the zeros in place.
    plain = timm.create_model(f"local-dir:{out}", pretrained=True)
    for name, keep in pm.masks.items():
        assert torch.equal(plain.get_submodule(name).weight == 0, ~keep)


def test_prune_a_pruned_save_again_in_a_pattern(plain_dir, tmp_path):
    first = str(tmp_path / "first")
    assert cli_main(["prune", plain_dir, "--method", "magnitude", "--sparsity", "0.3", "--output", first]) == 0
    assert timm_prune.from_pretrained(first).config.scope == "lamp"  # no --scope: the method's default
    second = str(tmp_path / "second")
    args = ["prune", first, "--method", "wanda", "--pattern", "2:4", "--dataset", "digits", "--image-size", "16"]
    assert cli_main([*args, "--calibration-batches", "1", "--output", second]) == 0
    pm = timm_prune.from_pretrained(second)
    assert pm.config.pattern == "2:4" and all(is_nm(keep, "2:4") for keep in pm.masks.values())


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--method", "nope"], "PruneConfig.method"),
        (["--method", "sparsegpt", "--sparsity", "1.5", "--dataset", "digits"], "PruneConfig.sparsity"),
        (["--method", "sparsegpt"], "needs calibration images: pass --dataset"),
        (["--method", "autobot", "--dataset", "digits"], "removes channels"),
        (["--method", "wanda", "--dataset", "digits", "--option", "bogus=1"], "bogus"),
        (["--method", "magnitude", "--pattern", "2/4"], "PruneConfig.pattern"),
        (["--method", "wanda", "--scope", "lamp", "--dataset", "digits"], "scope 'lamp' is not supported"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(plain_dir, tmp_path, capsys, extra, message):
    out = tmp_path / "never"
    assert cli_main(["prune", plain_dir, *extra, "--output", str(out)]) == 1
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1
    assert not out.exists()


def test_bad_model_and_busy_output(tmp_path, capsys):
    assert cli_main(["prune", str(tmp_path / "missing"), "--method", "magnitude", "--output", str(tmp_path / "o")]) == 1
    assert "error" in capsys.readouterr().err and not (tmp_path / "o").exists()
    busy = tmp_path / "busy"
    busy.mkdir()
    (busy / "file").write_text("x")
    assert cli_main(["prune", "test_resnet", "--method", "magnitude", "--output", str(busy)]) == 1
    assert "not an empty directory" in capsys.readouterr().err and os.listdir(busy) == ["file"]


def test_calibration_images_are_a_stratified_sample_of_a_label_sorted_split(tmp_path):
    # A split sorted by class (as many image folders and exports are): the first N rows would all be class 0.
    import datasets
    import numpy as np
    from PIL import Image

    from timm_prune.data import load_eval_tensors

    labels = [i // 10 for i in range(40)]
    rows = {"image": [Image.fromarray(np.full((8, 8, 3), 60 * c, np.uint8)) for c in labels], "label": labels}
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=4)})
    datasets.Dataset.from_dict(rows, features=features).to_parquet(str(tmp_path / "train.parquet"))
    images, got, _ = load_eval_tensors(str(tmp_path), "train", 8, 3, (0.0,) * 3, (1.0,) * 3, 8)
    assert sorted(got.tolist()) == [0, 0, 1, 1, 2, 2, 3, 3]
    # Each image still matches its label (the sample selects rows, it does not shuffle images against labels).
    assert torch.allclose(images[:, 0, 0, 0], got.float() * 60 / 255, atol=1e-6)
