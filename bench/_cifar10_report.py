"""Decisions, tables and the plot of ``bench/cifar10.py`` (from the rows its evaluation produced)."""

from __future__ import annotations

import json
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

DATA_FREE_CHOICES = ("zero", "mean", "layer_mean", "renorm")
LABELS = {
    "plain": "plain (magnitude)",
    "pof": "POF",
    "pof_nested": "POF nested",
    "pof_global": "POF global",
    "pof_combined": "POF global+nested+warm-up",
}


def _average(rows: list[dict[str, Any]], **match: Any) -> float | None:
    values = [r["top1"] for r in rows if all(r.get(k) == v for k, v in match.items())]
    return round(statistics.mean(values), 2) if values else None


def decide(rows: list[dict[str, Any]], specs: dict[str, dict[str, Any]]) -> dict[str, Any]:
    """Choices made on the held-out part of train (split "val"), averaged over the benchmark's sparsities."""
    val = [r for r in rows if r["split"] == "val"]
    decisions: dict[str, Any] = {}
    for run in ("plain", "pof"):
        scores = {v: _average(val, run=run, variant=v) for v in DATA_FREE_CHOICES}
        scores = {k: v for k, v in scores.items() if v is not None}
        if scores:
            decisions[f"recovery_{run}"] = {"scores": scores, "best": max(scores, key=scores.get)}
    ablation = []
    for run, flags in specs.items():
        if not run.startswith("pof"):
            continue
        run_rows = [r for r in val if r["run"] == run]
        if not run_rows:
            continue
        switch = {k: v for k, v in flags.items() if k not in ("method", "sparsity")} or "defaults"
        entry = {"run": run, "switch": switch, "dense_top1": run_rows[0]["dense_top1"]}
        for variant in ("zero", "mean", "bn_recal"):
            entry[f"avg_{variant}"] = _average(run_rows, variant=variant)
            entry[variant] = {r["sparsity"]: r["top1"] for r in run_rows if r["variant"] == variant}
        ablation.append(entry)
    if ablation:
        best = max(ablation, key=lambda e: e["avg_mean"] or 0.0)
        decisions["ablation"] = ablation
        decisions["best_pof_run"] = best["run"]
    return decisions


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def main_table(results: dict[str, Any]) -> str:
    test = [r for r in results["runs"] if r["split"] == "test"]
    sparsities = results["sparsities"]
    lines = [
        "| model, scope, variant | dense | " + " | ".join(f"{100 * s:g} %" for s in sparsities) + " |",
        "|---|---:|" + "---:|" * len(sparsities),
    ]
    groups: dict[tuple, dict[float, float]] = defaultdict(dict)
    dense: dict[tuple, float] = {}
    for r in test:
        key = (r["run"], r["scope"], r["variant"])
        groups[key][r["sparsity"]] = r["top1"]
        dense[key] = r["dense_top1"]
    for key, by_sparsity in groups.items():
        run, scope, variant = key
        label = f"{LABELS.get(run, run)}, {scope}, {variant}"
        cells = [_fmt(by_sparsity.get(s)) for s in sparsities]
        lines.append(f"| {label} | {dense[key]:.2f} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def ablation_table(results: dict[str, Any]) -> str:
    entries = results["decisions"].get("ablation", [])
    if not entries:
        return ""
    sparsities = results["sparsities"]
    lines = [
        "| POF run (switch) | dense | " + " | ".join(f"mean @ {100 * s:g} %" for s in sparsities) + " | avg zero | "
        "avg mean | avg BN |",
        "|---|---:|" + "---:|" * (len(sparsities) + 3),
    ]
    for e in entries:
        switch = e["switch"] if isinstance(e["switch"], str) else ", ".join(f"{k}={v}" for k, v in e["switch"].items())
        cells = [_fmt(e["mean"].get(s)) for s in sparsities]
        lines.append(
            f"| {e['run']} ({switch}) | {e['dense_top1']:.2f} | " + " | ".join(cells) + f" | {_fmt(e['avg_zero'])} | "
            f"{_fmt(e['avg_mean'])} | {_fmt(e['avg_bn_recal'])} |"
        )
    return "\n".join(lines)


def summary_lines(results: dict[str, Any]) -> list[str]:
    lines = [
        f"- dead weights (no gradient) at {results['img_size']} px: fresh model "
        f"{100 * results['dead_weights_fresh']:.2f} %, "
        f"trained plain model {100 * results['dead_weights_trained']:.2f} %",
        f"- training step time, POF over plain, identical batches of {results['batch_size']} interleaved: median "
        f"x{results['step_time_ratio']:.3f} (mean incl. candidate refreshes x{results['mean_step_time_ratio']:.3f})",
    ]
    for name, choice in results["decisions"].items():
        if name.startswith("recovery_"):
            scores = ", ".join(f"{k} {v:.2f}" for k, v in choice["scores"].items())
            lines.append(f"- held-out top-1 averaged over sparsities, {name[9:]}: {scores} -> best {choice['best']}")
    if "best_pof_run" in results["decisions"]:
        lines.append(
            f"- best POF configuration on the held-out split (avg mean-recovered top-1): "
            f"{results['decisions']['best_pof_run']}"
        )
    for row in results.get("prune_cost", []):
        lines.append(
            f"- prune() global, {row['model']} ({row['targeted_weights'] / 1e6:.0f}M weights): "
            f"{row['prune_s_median']:.2f} s, peak extra memory {row['peak_extra_over_weights']:.2f}x the weights"
        )
    return lines


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = [r for r in results["runs"] if r["split"] == "test"]
    groups: dict[tuple, list[tuple[float, float]]] = defaultdict(list)
    for r in test:
        groups[(r["run"], r["scope"], r["variant"])].append((r["sparsity"], r["top1"]))
    fig, ax = plt.subplots(figsize=(10, 5.5))
    colors = plt.get_cmap("tab20").colors
    for index, ((run, scope, variant), points) in enumerate(groups.items()):
        points.sort()
        style = "-" if run.startswith("pof") else "--"
        ax.plot(
            [100 * s for s, _ in points],
            [t for _, t in points],
            style,
            marker="o",
            ms=3,
            color=colors[index % len(colors)],
            label=f"{LABELS.get(run, run)}, {scope}, {variant}",
        )
    ax.set(
        xlabel="sparsity (%)",
        ylabel="top-1 (%) without fine-tuning",
        title=f"CIFAR-10 test, {results['model']} at {results['img_size']} px, {results['epochs']} epochs",
    )
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def atomic_write_text(path: Path, text: str) -> None:
    """Temporary name, then rename: a crash never leaves half a results file."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_results(results: dict[str, Any], directory: Path) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    text = "\n\n".join(
        part
        for part in (
            f"`{results['command']}` ({results['wall_time_min']} min)",
            main_table(results),
            ablation_table(results),
            "\n".join(summary_lines(results)),
        )
        if part
    )
    atomic_write_text(directory / "cifar10.json", json.dumps(results, indent=2, default=str) + "\n")
    atomic_write_text(directory / "cifar10.md", text + "\n")
    plot(results, directory / "cifar10.png")
    print(text)
