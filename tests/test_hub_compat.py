"""Directories saved before the "One house" move (issue 12) still load, with the same outputs.

``tests/fixtures/pre_move_*`` were written by timm_prune at commit 632d76b (flat layout) and are never
regenerated: they pin the saved file formats across refactors. Each holds ``expected_io.safetensors`` (an
input batch and the model's output at save time) beside the files ``save_pretrained`` wrote.
"""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import load_file

import timm_prune

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures")


def _expected(name: str) -> dict[str, torch.Tensor]:
    return load_file(os.path.join(FIXTURES, name, "expected_io.safetensors"))


def test_unstructured_compact_save_from_before_the_move_loads():
    pm = timm_prune.from_pretrained(os.path.join(FIXTURES, "pre_move_pof"))
    io = _expected("pre_move_pof")
    assert pm.config.method == "pof" and pm.recovery == "mean" and pm.is_pruned
    assert pm.metrics["accuracy_dense"] == 0.5
    with torch.no_grad():
        torch.testing.assert_close(pm(io["input"]), io["output_recovered"], rtol=1e-5, atol=1e-5)
    assert pm.last_report.sparsity == pytest.approx(0.6, abs=0.01)


def test_structured_save_from_before_the_move_loads(tmp_path):
    pm = timm_prune.from_pretrained(os.path.join(FIXTURES, "pre_move_autobot"))
    io = _expected("pre_move_autobot")
    assert pm.config.method == "autobot" and pm.is_pruned
    assert isinstance(pm.last_report, timm_prune.StructuredReport)
    with torch.no_grad():
        torch.testing.assert_close(pm(io["input"]), io["output"], rtol=1e-5, atol=1e-5)
    # Saving it again writes a loadable directory (the structure record survives the round trip).
    again = timm_prune.from_pretrained(pm.save_pretrained(tmp_path / "again"))
    with torch.no_grad():
        torch.testing.assert_close(again(io["input"]), io["output"], rtol=1e-5, atol=1e-5)
