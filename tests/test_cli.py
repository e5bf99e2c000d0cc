"""The ``timm-prune`` console script: ``info`` and ``eval`` on unstructured and structured saves (``push``, which
needs the test Hub server, is in test_hub.py)."""

from __future__ import annotations

import json

import pytest
import timm
import torch

import timm_prune
from timm_prune.cli import main as cli_main


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory):
    # A POF model pruned to 60 % with mean recovery and metrics, as test_hub.py saves it.
    torch.manual_seed(0)
    model, x = timm.create_model("test_resnet", num_classes=7), torch.randn(2, 3, 32, 32)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(method="pof", sparsity=0.6))
    pm.prune()
    pm.recover("mean")
    pm.metrics = {"accuracy_dense": 0.91, "accuracy_pruned": 0.52, "accuracy_recovered": 0.83, "dataset": "digits"}
    path = str(tmp_path_factory.mktemp("cnn") / "model")
    pm.eval().save_pretrained(path)
    return pm, x, path


def test_cli_info_and_eval_on_a_structured_save(tmp_path, capsys):
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    pm = timm_prune.convert(model, method="autobot", flops_target=0.5, input_size=[3, 16, 16], latency_runs=1)
    x, y = torch.randn(8, 3, 16, 16), torch.randint(0, 10, (8,))
    pm.calibrate([(x, y)] * 4, num_batches=4)
    report = pm.prune()
    path = str(tmp_path / "narrow")
    pm.save_pretrained(path)

    assert cli_main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "structured:" in out and f"{report.params_before:,} -> {report.params_after:,}" in out
    group = report.groups[0]
    assert f"{group['kept']:>6} / {group['channels']}" in out

    assert cli_main(["eval", path, "--dataset", "digits", "--image-size", "16", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)["results"]
    loaded = timm_prune.from_pretrained(path).eval()
    from timm_prune.data import load_eval_tensors

    cfg = loaded.model.pretrained_cfg
    images, labels, _ = load_eval_tensors("digits", "test", 16, 3, cfg["mean"], cfg["std"], None)
    with torch.no_grad():
        expected = int((loaded(images).argmax(1) == labels).sum())
    assert [r["correct"] for r in results] == [expected] and results[0]["recovery"] == "none"
    assert cli_main(["eval", path, "--dataset", "digits", "--image-size", "16"]) == 0
    assert "structured, " in capsys.readouterr().out


def test_cli_info(saved_cnn, capsys):
    pm, _, path = saved_cnn
    assert cli_main(["info", path]) == 0
    out = capsys.readouterr().out
    assert "test_resnet (7 classes)" in out and "method:        pof" in out
    assert f"{pm.last_report.sparsity:.2%} of {pm.last_report.numel:,} targeted weights" in out
    assert all(layer.name in out for layer in pm.last_report.layers)
    assert cli_main(["info", path, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["config"] == pm.config.to_dict()
    assert cli_main(["info", str(path) + "-missing"]) == 1
    assert "error" in capsys.readouterr().err


def _digits(split: slice, size: int) -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = torch.tensor(d.images[split], dtype=torch.float32)[:, None] / 16.0
    x = torch.nn.functional.interpolate(x, size=(size, size), mode="bilinear", align_corners=False)
    return (x.repeat(1, 3, 1, 1) - 0.5) / 0.5, torch.tensor(d.target[split])


def test_cli_eval_digits(tmp_path, capsys):
    # Nearest class centroid on random-conv features: a classifier without training whose pruned and
    # recovered variants predict differently, so the counts below tell the two apart.
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=10).eval()
    x_train, y_train = _digits(slice(0, -360), 16)
    with torch.no_grad():
        feats = model.forward_head(model.forward_features(x_train), pre_logits=True)
        centroids = torch.stack([feats[y_train == c].mean(0) for c in range(10)])
        model.fc.weight.copy_(centroids)
        model.fc.bias.copy_(-0.5 * centroids.square().sum(1))
    pm = timm_prune.convert(model, sparsity=0.1, scope="layer")
    pm.prune()
    pm.recover("mean")
    path = str(tmp_path / "digits")
    pm.save_pretrained(path)

    x_test, y_test = _digits(slice(-360, None), 16)
    with torch.no_grad():
        expected = {"mean": int((pm.eval()(x_test).argmax(1) == y_test).sum())}
        expected["none"] = int((pm.merge_and_unload().eval()(x_test).argmax(1) == y_test).sum())
    assert expected["none"] != expected["mean"]

    args = ["eval", path, "--dataset", "digits", "--image-size", "16"]
    assert cli_main(args + ["--json"]) == 0
    results = {r["recovery"]: r for r in json.loads(capsys.readouterr().out)["results"]}
    assert {k: r["correct"] for k, r in results.items()} == expected
    assert all(r["total"] == 360 for r in results.values())
    assert cli_main(args) == 0
    out = capsys.readouterr().out
    assert "360 images at 16x16" in out and f"{expected['none']}/360" in out and f"{expected['mean']}/360" in out
