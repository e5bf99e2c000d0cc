"""`timm-prune info` / `eval` on a structurally pruned save (channels removed, no per-weight sparsity)."""

from __future__ import annotations

import json

import timm
import torch

import timm_prune
from timm_prune.cli import main as cli_main


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
    from timm_prune.cli import _load_eval_data

    cfg = loaded.model.pretrained_cfg
    images, labels, _ = _load_eval_data("digits", "test", 16, 3, cfg["mean"], cfg["std"], None)
    with torch.no_grad():
        expected = int((loaded(images).argmax(1) == labels).sum())
    assert [r["correct"] for r in results] == [expected] and results[0]["recovery"] == "none"
    assert cli_main(["eval", path, "--dataset", "digits", "--image-size", "16"]) == 0
    assert "structured, " in capsys.readouterr().out
