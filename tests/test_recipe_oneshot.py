"""The recipe with no training: ``--method sparsegpt|wanda --epochs 0`` calibrates on training images and prunes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_recipe import TINY, check_ok, launch

import timm_prune


@pytest.mark.parametrize("method", ["sparsegpt"])
def test_recipe_epochs_0_calibrates_prunes_and_saves(method: str, tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = [*TINY, "--method", method, "--calibration_batches", "2", "--epochs", "0", "--sparsity", "0.5"]
    result = launch([*flags, "--report_to", "none", "--output_dir", str(out)], tmp_path)
    check_ok(result)
    assert f"calibration ({method})" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["history"] == [] and metrics["prune_config"]["calibration_batches"] == 2
    assert metrics["final"]["sparsity"] == pytest.approx(0.5, abs=0.02)
    loaded = timm_prune.from_pretrained(str(out))
    assert loaded.config.method == method and loaded.is_pruned


def test_recipe_rejects_negative_epochs_and_a_pattern_sparsity_clash(tmp_path: Path) -> None:
    result = launch([*TINY, "--epochs", "-1", "--output_dir", str(tmp_path / "a")], tmp_path)
    assert result.returncode != 0 and "--epochs must be >= 0" in result.stderr
    flags = [*TINY, "--method", "wanda", "--pattern", "2:4", "--sparsity", "0.7", "--epochs", "0"]
    result = launch([*flags, "--output_dir", str(tmp_path / "b")], tmp_path)
    assert result.returncode != 0 and "PruneConfig.sparsity must be 1 - N/M" in result.stderr
    assert not (tmp_path / "b").exists()
