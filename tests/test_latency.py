"""Latency of a structured prune (issue 16, item 7): torch.utils.benchmark at a fixed thread count, dense and
pruned interleaved, a median speed-up with its quartiles; never one pair of runs."""

from __future__ import annotations

import sys
from pathlib import Path

import torch
import torch.nn as nn
from torch.utils import benchmark

from timm_prune.reports import StructuredReport
from timm_prune.structured import measure

sys.path.insert(0, str(Path(__file__).resolve().parent))
from test_method_autobot import batches, make  # noqa: E402


def test_paired_latency_interleaves_and_reports_a_spread(monkeypatch):
    calls = []
    real_timer = benchmark.Timer

    def recording_timer(*args, **kwargs):
        calls.append(kwargs["globals"]["model"])
        assert kwargs["num_threads"] == 1
        return real_timer(*args, **kwargs)

    monkeypatch.setattr(benchmark, "Timer", recording_timer)
    dense, pruned = nn.Sequential(nn.Linear(256, 2048), nn.Linear(2048, 256)), nn.Linear(256, 256)
    stats = measure.paired_latency(dense, pruned, torch.randn(4, 256), runs=9)
    assert calls == [dense, pruned]  # one timer each, both timed every round
    assert stats["rounds"] == 9 and stats["threads"] == 1
    assert stats["speedup_q1"] <= stats["speedup"] <= stats["speedup_q3"]
    assert stats["speedup"] > 1  # the smaller model is faster


def test_structured_report_carries_the_median_speedup_and_quartiles():
    pm = make("test_resnet", flops_target=0.5, latency_runs=5)
    pm.calibrate(batches(3), num_batches=3)
    report = pm.prune()
    assert report.speedup_q1 <= report.speedup == report.speedup_median <= report.speedup_q3
    assert report.latency_threads == 1
    assert "quartiles" in str(report) and "torch.utils.benchmark" in str(report)
    again = StructuredReport.from_dict(report.to_dict())
    assert again.speedup == report.speedup
    old = {k: v for k, v in report.to_dict().items() if not k.startswith(("speedup_", "latency_threads"))}
    assert StructuredReport.from_dict(old).speedup == report.latency_ms_before / report.latency_ms_after
