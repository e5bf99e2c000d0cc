"""The model card (README.md) and its plot, rendered in memory before anything is written.

The template is a Jinja file filled through huggingface_hub's ``ModelCard.from_template``; its YAML header
comes from ``ModelCardData`` (library_name timm, tags, base_model, datasets, model-index when accuracies are
known). The template is ``templates/model_card.md`` beside this module, its only copy (package data, so that
editable installs and wheels read the same file; ``hub_cards/README.md`` at the top of the repository points here).
"""

from __future__ import annotations

import io
import os
import re
from pathlib import Path
from typing import Any

from huggingface_hub import EvalResult, ModelCard, ModelCardData

_TEMPLATE = "model_card.md"
_ACCURACY_KEYS = (
    ("accuracy_dense", "dense (before pruning)", "accuracy (dense)"),
    ("accuracy_pruned", "pruned", "accuracy (pruned)"),
    ("accuracy_recovered", "pruned + recovery", "accuracy (pruned + recovery)"),
)
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def template_path() -> str:
    """The packaged model-card template."""
    return str(Path(__file__).parent / "templates" / _TEMPLATE)


def is_repo_id(value: Any) -> bool:
    return isinstance(value, str) and bool(_REPO_ID.match(value))


def render_plot(report: dict[str, Any] | None, metrics: dict[str, Any]) -> bytes:
    """PNG: per-layer sparsity (structured methods: channels kept per group), plus accuracy against sparsity when
    ``metrics["sparsity_sweep"]`` has points."""
    # The Agg canvas directly: no pyplot, so the user's global backend and figure list are left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    sweep = [p for p in metrics.get("sparsity_sweep") or [] if isinstance(p, dict) and "sparsity" in p]
    layers = (report or {}).get("layers", [])
    fig = Figure(figsize=(10, 3.6 if not sweep else 7.2), dpi=100)
    FigureCanvasAgg(fig)
    axes = fig.subplots(2 if sweep else 1, 1, squeeze=False)[:, 0]
    ax = axes[0]
    if (report or {}).get("kind") == "structured":
        _plot_channels(ax, report)
    elif layers:
        ax.bar(range(len(layers)), [100 * layer["sparsity"] for layer in layers], color="#4c72b0")
        ax.axhline(100 * report["target_sparsity"], color="#c44e52", linestyle="--", label="target")
        step = max(1, len(layers) // 40)  # keep the tick labels readable on deep models
        ax.set_xticks(range(0, len(layers), step))
        ax.set_xticklabels([layers[i]["name"] for i in range(0, len(layers), step)], rotation=90, fontsize=6)
        ax.legend(loc="lower right")
    else:
        ax.text(0.5, 0.5, "not pruned", ha="center", va="center", transform=ax.transAxes)
    if (report or {}).get("kind") != "structured":
        ax.set_ylabel("sparsity (%)")
        ax.set_ylim(0, 100)
        ax.set_title("Per-layer sparsity")
    if sweep:
        ax = axes[1]
        xs = [100 * float(p["sparsity"]) for p in sweep]
        keys = sorted({k for p in sweep for k in p if k.startswith("accuracy")})
        for key in keys:
            points = [(x, 100 * float(p[key])) for x, p in zip(xs, sweep, strict=True) if p.get(key) is not None]
            ax.plot([a for a, _ in points], [b for _, b in points], marker="o", label=key.replace("accuracy_", ""))
        ax.set_xlabel("sparsity (%)")
        ax.set_ylabel("accuracy (%)")
        ax.set_title("Accuracy against sparsity")
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return buffer.getvalue()


def _plot_channels(ax: Any, report: dict[str, Any]) -> None:
    """Structured report: channels of each coupled group before (outline) and after (filled) removal."""
    groups = report.get("groups") or []
    xs = range(len(groups))
    ax.bar(xs, [g["channels"] for g in groups], color="none", edgecolor="#8c8c8c", label="before")
    ax.bar(xs, [g["kept"] for g in groups], color="#4c72b0", label="kept")
    step = max(1, len(groups) // 40)
    ax.set_xticks(range(0, len(groups), step))
    ax.set_xticklabels([groups[i]["root"] for i in range(0, len(groups), step)], rotation=90, fontsize=6)
    ax.set_ylabel("channels")
    ratio = report["flops_after"] / report["flops_before"] if report.get("flops_before") else float("nan")
    params = report["params_after"] / report["params_before"] if report.get("params_before") else float("nan")
    ax.set_title(f"Channels kept per group (FLOPs {ratio:.1%}, parameters {params:.1%} of the dense model)")
    ax.legend(loc="upper left")


def render_card(
    *,
    repo_id: str,
    architecture: str,
    pruning: dict[str, Any],
    save_format: str,
    plot_name: str,
    template: str | os.PathLike | None = None,
) -> str:
    """README.md text for the saved model; ``pruning`` is the content of pruning_config.json."""
    config = pruning["config"]
    report = pruning.get("report") or {"layers": [], "sparsity": 0.0, "numel": 0, "target_sparsity": 0.0}
    metrics = pruning.get("metrics") or {}
    base_model = pruning.get("base_model")
    dataset = metrics.get("dataset")
    known = [(label, name, metrics.get(key)) for key, label, name in _ACCURACY_KEYS]
    accuracy = [(label, name, float(v)) for label, name, v in known if isinstance(v, (int, float))]
    accuracy_rows = [(label, value) for label, _, value in accuracy]
    model_name = repo_id.split("/")[-1]
    eval_results = None
    if accuracy_rows and isinstance(dataset, str):
        eval_results = [
            EvalResult(
                task_type="image-classification",
                dataset_type=dataset,
                dataset_name=dataset,
                dataset_split=metrics.get("dataset_split"),
                metric_type="accuracy",
                metric_name=name,
                metric_value=round(value, 6),
            )
            for _, name, value in accuracy
        ]
    structured = report.get("kind") == "structured"
    card_data = ModelCardData(
        # Stock timm cannot build a narrowed (channels removed) model: such a card names the library that loads
        # it (the body says how: timm_prune.from_pretrained).
        library_name="timm_prune" if structured else "timm",
        pipeline_tag="image-classification",
        tags=["image-classification", "timm", "timm_prune", "pruning", f"pruning-{config['method']}", "sparse"],
        base_model=base_model if is_repo_id(base_model) else None,
        datasets=[dataset] if is_repo_id(dataset) else None,
        model_name=model_name,
        eval_results=eval_results,
    )
    settings = [(k, v) for k, v in sorted(config.items())]
    shown = {"dataset", "dataset_split", "sparsity_sweep", *(k for k, _, _ in _ACCURACY_KEYS)}
    other = [(k, v) for k, v in sorted(metrics.items()) if k not in shown and isinstance(v, (int, float, str))]
    card = ModelCard.from_template(
        card_data,
        template_path=str(template or template_path()),
        model_name=model_name,
        repo_id=repo_id,
        architecture=architecture,
        base_model=base_model if is_repo_id(base_model) else None,
        method=config["method"],
        scope=config.get("scope"),  # absent for methods that do not use it (structured ones)
        settings=settings,
        overall_sparsity=float(report.get("sparsity", 0.0)),
        target_sparsity=float(report.get("target_sparsity", config.get("sparsity") or 0.0)),
        numel=int(report.get("numel", 0)),
        num_zeros=int(round(float(report.get("sparsity", 0.0)) * int(report.get("numel", 0)))),
        layers=report.get("layers", []),
        saved_recovery=pruning.get("recovery", "none"),
        default_recovery=default_recovery(pruning),
        recovery_kinds=pruning.get("recovery_kinds") or ["none"],
        bias_corrected=len(report.get("bias_corrected") or []),
        accuracy_rows=accuracy_rows,
        dataset=dataset,
        other_metrics=other,
        has_sweep=bool(metrics.get("sparsity_sweep")),
        plot_name=plot_name,
        save_format=save_format,
        library_version=pruning.get("library_version", "?"),
        # Structured methods (channels removed): their report, else None.
        structured=report if structured else None,
    )
    return str(card)


def default_recovery(pruning: dict[str, Any]) -> str:
    """What ``from_pretrained(recover=True)`` applies: the recovery active at save time, else the config's."""
    if not pruning.get("report") or pruning.get("structure") is not None:
        return "none"  # never pruned, or channels removed (nothing to recover)
    if pruning["report"].get("bias_corrected"):
        return "none"  # the corrected biases already stand in for the pruned weights
    saved = pruning.get("recovery", "none")
    return saved if saved != "none" else pruning["config"].get("recovery", "none")
