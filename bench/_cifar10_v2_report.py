"""Tables, winners and the plot of ``bench/cifar10_v2.py``, recomputed from its rows alone."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import defaultdict
from pathlib import Path
from typing import Any

DATA_FREE = ("zero", "mean")
WITH_DATA = ("bn_recal", "mean+bn_recal", "bias")
ORDER = (
    "pof", "plain", "plain_layer", "plain_lamp", "gmp", "base", "base_layer", "base_lamp", "wanda", "sparsegpt",
    "wanda_global", "sparsegpt_global", "wanda_base", "sparsegpt_base", "wanda_global_base", "sparsegpt_global_base",
)  # fmt: skip
LABELS = {
    "plain": "plain FT + global magnitude",
    "pof": "POF FT (one model)",
    "gmp": "GMP FT (one model per sparsity)",
    "base": "base, no FT, global magnitude",
    "plain_layer": "plain FT + magnitude per layer",
    "base_layer": "base, no FT, magnitude per layer",
    "plain_lamp": "plain FT + magnitude on LAMP scores",
    "base_lamp": "base, no FT, magnitude on LAMP scores",
    "wanda": "plain FT + Wanda (one-shot, per layer)",
    "sparsegpt": "plain FT + SparseGPT (one-shot, per layer)",
    "wanda_base": "base, no FT, Wanda (per layer)",
    "sparsegpt_base": "base, no FT, SparseGPT (per layer)",
    "wanda_global": "plain FT + Wanda (one-shot, one global threshold)",
    "sparsegpt_global": "plain FT + SparseGPT (one-shot, global threshold)",
    "wanda_global_base": "base, no FT, Wanda (global)",
    "sparsegpt_global_base": "base, no FT, SparseGPT (global)",
}


def atomic_write_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_figures(directory: Path, stem: str, payload: dict[str, Any], lines: list[str]) -> None:
    """A benchmark's figures as ``<stem>.json`` and its table as ``<stem>.md``, each written whole or not at all."""
    atomic_write_text(directory / f"{stem}.json", json.dumps(payload, indent=2, default=str) + "\n")
    atomic_write_text(directory / f"{stem}.md", "\n".join(lines) + "\n")


def stats(values: list[float]) -> dict[str, float]:
    mean = statistics.mean(values)
    std = statistics.stdev(values) if len(values) > 1 else 0.0
    return {"mean": round(mean, 2), "std": round(std, 2), "n": len(values)}


def aggregate(rows: list[dict[str, Any]], split: str) -> dict[tuple[str, str, float], dict[str, float]]:
    """(contender, variant, sparsity) -> mean / std / n of top-1 over seeds."""
    groups: dict[tuple[str, str, float], list[float]] = defaultdict(list)
    for r in rows:
        if r["split"] == split:
            groups[(r["contender"], r["variant"], r["sparsity"])].append(r["top1"])
    return {key: stats(values) for key, values in groups.items()}


def choose_variants(rows: list[dict[str, Any]]) -> dict[str, dict[str, str]]:
    """Per contender, its best data-free and best data-using variant on the held-out split (mean over sparsities)."""
    val = aggregate(rows, "val")
    choices: dict[str, dict[str, str]] = {}
    for contender in {c for c, _, _ in val}:
        choices[contender] = {}
        for kind, variants in (("data_free", DATA_FREE), ("with_data", WITH_DATA)):
            scores = {}
            for variant in variants:
                values = [s["mean"] for (c, v, sp), s in val.items() if c == contender and v == variant and sp > 0]
                if values:
                    scores[variant] = statistics.mean(values)
            if scores:
                choices[contender][kind] = max(scores, key=scores.get)
    return choices


def _cell(entry: dict[str, float] | None) -> str:
    if entry is None:
        return "-"
    return f"{entry['mean']:.2f} ± {entry['std']:.2f}" if entry["n"] > 1 else f"{entry['mean']:.2f}"


def winners(results: dict[str, Any], kind: str) -> list[dict[str, Any]]:
    """At each sparsity, the contenders ranked by mean test top-1 with their chosen variant of ``kind``; whether the
    lead over the runner-up exceeds two standard errors of the difference (seed-to-seed spread)."""
    test = aggregate(results["rows"], "test")
    choices = results["choices"]
    out = []
    for sparsity in results["sparsities"]:
        ranked = []
        for contender, chosen in choices.items():
            variant = chosen.get(kind)
            entry = test.get((contender, variant, sparsity))
            if entry is not None:
                ranked.append((entry["mean"], contender, variant, entry))
        ranked.sort(reverse=True)
        if len(ranked) < 2:
            continue
        (m1, c1, v1, e1), (m2, c2, v2, e2) = ranked[0], ranked[1]
        se = math.sqrt(e1["std"] ** 2 / e1["n"] + e2["std"] ** 2 / e2["n"])
        both_seeded = e1["n"] > 1 and e2["n"] > 1
        out.append(
            {
                "sparsity": sparsity,
                "winner": c1,
                "variant": v1,
                "top1": m1,
                "runner_up": c2,
                "runner_up_variant": v2,
                "runner_up_top1": m2,
                "lead": round(m1 - m2, 2),
                "significant": bool(both_seeded and (m1 - m2) > 2 * se),
                "seeds": min(e1["n"], e2["n"]),
            }
        )
    return out


def contenders_in_order(results: dict[str, Any]) -> list[str]:
    """The fixed contenders first, then POF variants (``pof_*``) by name."""
    present = set(results.get("choices", {}))
    return [c for c in ORDER if c in present] + sorted(present - set(ORDER))


def label(contender: str, results: dict[str, Any]) -> str:
    scope = results.get("gmp_scope", "global")
    if contender == "gmp" and scope != "global":
        return f"GMP FT on {'LAMP scores' if scope == 'lamp' else 'each layer'} (one model per sparsity)"
    return LABELS.get(contender, f"POF FT variant {contender}")


def main_table(results: dict[str, Any]) -> str:
    test = aggregate(results["rows"], "test")
    sparsities = results["sparsities"]
    head = "| contender | variant | seeds | dense | " + " | ".join(f"{100 * s:.0f} %" for s in sparsities) + " |"
    lines = [head, "|---|---|---:|---:|" + "---:|" * len(sparsities)]
    for contender in contenders_in_order(results):
        chosen = results["choices"].get(contender)
        if not chosen:
            continue
        # Contenders may have more seeds than others (a gap worth pinning down got more): say how many.
        seeds = len({r["seed"] for r in results["rows"] if r["contender"] == contender and r["split"] == "test"})
        dense = test.get((contender, "dense", 0.0))
        variants = sorted(set(chosen.values()), key=lambda v: (v not in DATA_FREE, v))
        name = label(contender, results)
        for variant in variants:
            cells = [_cell(test.get((contender, variant, s))) for s in sparsities]
            lines.append(f"| {name} | {variant} | {seeds} | {_cell(dense)} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def all_variants_table(results: dict[str, Any]) -> str:
    test = aggregate(results["rows"], "test")
    sparsities = results["sparsities"]
    lines = ["| contender | variant | " + " | ".join(f"{100 * s:.0f} %" for s in sparsities) + " |"]
    lines.append("|---|---|" + "---:|" * len(sparsities))
    for contender in contenders_in_order(results):
        for variant in DATA_FREE + WITH_DATA:
            cells = [test.get((contender, variant, s)) for s in sparsities]
            if any(cells):
                lines.append(f"| {contender} | {variant} | " + " | ".join(_cell(c) for c in cells) + " |")
    return "\n".join(lines)


def winner_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for kind, title in (("with_data", "with BatchNorm re-estimation"), ("data_free", "data-free")):
        lines.append(f"Winners, {title} (each contender with its variant chosen on the held-out split):")
        for w in results["winners"][kind]:
            verdict = "exceeds" if w["significant"] else "does not exceed"
            lines.append(
                f"- {100 * w['sparsity']:.0f} %: {w['winner']} ({w['variant']}) {w['top1']:.2f} vs "
                f"{w['runner_up']} ({w['runner_up_variant']}) {w['runner_up_top1']:.2f}: lead {w['lead']:+.2f} pt, "
                f"{verdict} 2 standard errors ({w['seeds']} seed(s))"
            )
    return lines


def cost_lines(results: dict[str, Any]) -> list[str]:
    lines = []
    for name, row in (results.get("cost") or {}).items():
        lines.append(
            f"- step time {name} / plain (interleaved, median of paired ratios): x{row['step_time_ratio']:.3f}"
        )
    times: dict[str, list[float]] = defaultdict(list)
    for row in results.get("run_times", []):
        if row.get("wall_time_s"):
            times[row["contender"]].append(row["wall_time_s"])
    for contender, values in sorted(times.items()):
        lines.append(
            f"- {contender}: median wall time per fine-tuning run {statistics.median(values) / 60:.1f} min "
            f"({len(values)} run(s), {results.get('jobs', 1)} side by side)"
        )
    return lines


# The references every plot shows; the per-layer one-shot rows collapse from 70 % on and stay in the tables only.
PLOTTED_REFERENCES = (
    "plain", "plain_layer", "plain_lamp", "gmp", "base", "base_layer", "wanda_global", "sparsegpt_global",
)  # fmt: skip


def _plotted(contender: str, points: list[tuple[float, dict[str, float]]]) -> bool:
    """The references, and the POF contenders measured over more than one seed (the one-seed levers of an ablation
    stay in the tables: a plot with every one of them is unreadable)."""
    if contender in PLOTTED_REFERENCES:
        return True
    return contender.startswith("pof") and max(e["n"] for _, e in points) > 1


def plot(results: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    test = aggregate(results["rows"], "test")
    fig, axes = plt.subplots(1, 2, figsize=(12, 6.5), sharey=True)
    low, every = [], []  # plotted means up to 95 % set the frame's floor, so that their differences are visible
    panels = ((axes[0], "with_data", "with data (BatchNorm re-estimated or bias correction)"),
              (axes[1], "data_free", "data-free"))  # fmt: skip
    for ax, kind, title in panels:
        ax.set_prop_cycle(color=plt.cm.tab20.colors)
        for contender in contenders_in_order(results):
            variant = results["choices"].get(contender, {}).get(kind)
            points = [(s, test.get((contender, variant, s))) for s in results["sparsities"]]
            points = [(s, e) for s, e in points if e is not None]
            if not points or not _plotted(contender, points):
                continue
            xs = [100 * s for s, _ in points]
            low += [e["mean"] for s, e in points if s <= 0.95]
            every += [e["mean"] for _, e in points]
            ax.errorbar(
                xs,
                [e["mean"] for _, e in points],
                yerr=[e["std"] for _, e in points],
                marker="o",
                capsize=3,
                label=f"{label(contender, results)} [{variant}]",
            )
        ax.set_title(title)
        ax.set_xlabel("sparsity of the targeted weights (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, frameon=False)
    if low and min(every) < min(low) - 2:
        axes[0].set_ylim(bottom=min(low) - 2)
        axes[0].set_ylabel("CIFAR-10 test top-1 (%); points below the frame: see the table")
    else:
        axes[0].set_ylabel("CIFAR-10 test top-1 (%)")
    fig.suptitle("Pruned with no further training after the same fine-tuning budget")
    fig.tight_layout()
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_results(results: dict[str, Any], directory: Path) -> None:
    rows = results.get("rows", [])
    results["choices"] = choose_variants(rows)
    results["winners"] = {kind: winners(results, kind) for kind in ("with_data", "data_free")}
    base_dense = aggregate(rows, "test").get(("base", "dense", 0.0))
    if base_dense and "base" in results:
        results["base"]["top1"] = base_dense["mean"]
    atomic_write_text(directory / "cifar10_v2.json", json.dumps(results, indent=2, default=str) + "\n")
    base = results.get("base", {})
    md = [
        "# CIFAR-10 benchmark v2: pruning a trained model",
        "",
        f"Base: {base.get('model')} trained {base.get('epochs')} epochs, test top-1 {base.get('top1')} %. "
        f"Fine-tuning budget: {results['finetune_epochs']} epochs (lr {results.get('finetune_lr')}), seeds "
        f"{results['seeds']}. Cells: mean ± std over seeds, test top-1 (%). Variants chosen on the held-out split.",
        "",
        "Commands (each measured some of the rows; finished runs and rows are reused):",
        "",
        *[f"- `{command}`" for command in results.get("commands", [results.get("command")])],
        "",
        f"POF fine-tuning options: `{json.dumps(results.get('pof_options'))}`; variants (over those): "
        + (", ".join(f"`{k}` = `{json.dumps(v)}`" for k, v in (results.get("pof_variants") or {}).items()) or "none"),
        "",
        main_table(results),
        "",
        *winner_lines(results),
        "",
        "Cost:",
        *cost_lines(results),
        "",
        "Every variant (test):",
        "",
        all_variants_table(results),
        "",
    ]
    atomic_write_text(directory / "cifar10_v2.md", "\n".join(md))
    if rows:
        plot(results, directory / "cifar10_v2.png")
