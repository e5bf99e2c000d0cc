"""Start the recipe from any trained timm model: ``--model local-dir:<dir> --pretrained`` (and ``hf-hub:`` ids)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from shared_data import requires_cifar10  # noqa: E402

TINY = [
    "--img_size", "16", "--batch_size", "16", "--max_train_samples", "64", "--max_eval_samples", "32",
    "--num_workers", "0", "--bn_batches", "2", "--report_to", "none", "--method", "magnitude", "--sparsity", "0",
]  # fmt: skip


def run_recipe(
    args: list[str], tmp_path: Path, tiny: list[str] = TINY, timeout: int = 240
) -> subprocess.CompletedProcess:
    """The recipe in a subprocess, offline, after ``tiny`` (flags that keep it small; they override a ``--config``)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "hf_home"), OMP_NUM_THREADS="1", ACCELERATE_USE_CPU="1")
    command = [sys.executable, str(REPO / "recipes" / "train.py"), *tiny, *args]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"stdout:\n{result.stdout[-3000:]}\nstderr:\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="module")
def trained_dir(tmp_path_factory) -> Path:
    """A 'trained' model as stock timm saves one (config.json + model.safetensors), with distinctive weights."""
    directory = tmp_path_factory.mktemp("trained")
    torch.manual_seed(123)
    model = timm.create_model("test_resnet", num_classes=10)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)  # far from any fresh initialisation
    timm.models.save_for_hf(model, str(directory), safe_serialization=True)
    return directory


def _targeted_conv_weights(path: Path) -> dict[str, torch.Tensor]:
    state = load_file(str(path))
    return {k: v for k, v in state.items() if k.startswith("layer") and k.endswith("conv2.weight")}


@pytest.mark.parametrize("data_pipeline", ["tensor", "pil"])
def test_recipe_starts_from_the_saved_weights(trained_dir: Path, tmp_path: Path, data_pipeline: str):
    out = tmp_path / "finetuned"
    # lr 0: one optimizer step leaves the weights where they started, so the saved weights show the start.
    run_recipe(
        [
            "--model",
            f"local-dir:{trained_dir}",
            "--pretrained",
            "--max_train_steps",
            "1",
            "--lr",
            "0",
            "--data_pipeline",
            data_pipeline,
            "--output_dir",
            str(out),
        ],  # fmt: skip
        tmp_path,
    )
    source = _targeted_conv_weights(trained_dir / "model.safetensors")
    saved = _targeted_conv_weights(out / "model.safetensors")
    assert source and set(source) == set(saved)
    for name, weight in source.items():
        torch.testing.assert_close(saved[name], weight, msg=f"{name} did not start from the trained weights")


def test_without_pretrained_the_architecture_is_used_with_fresh_weights(trained_dir: Path, tmp_path: Path):
    out = tmp_path / "fresh"
    run_recipe(
        ["--model", f"local-dir:{trained_dir}", "--max_train_steps", "1", "--lr", "0", "--output_dir", str(out)],
        tmp_path,
    )
    source = _targeted_conv_weights(trained_dir / "model.safetensors")
    saved = _targeted_conv_weights(out / "model.safetensors")
    assert set(source) == set(saved)
    assert all(not torch.allclose(saved[n], w) for n, w in source.items())


def test_a_missing_local_dir_is_a_one_line_error(tmp_path: Path):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, str(REPO / "recipes" / "train.py"), *TINY, "--output_dir", str(tmp_path / "o")]
    command += ["--model", f"local-dir:{tmp_path / 'nowhere'}", "--pretrained"]
    result = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 2
    assert "error:" in result.stderr and "nowhere" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "o").exists()


# Each fine-tuning recipe, the POF settings the benchmark chose for its architecture, and the accuracy its
# committed base has on the 200 evaluation images (two steps from random weights stay near chance, 10 %).
FINETUNE_RECIPES = {
    "cifar10_finetune_pof.yaml": (
        {
            "scope": "global",
            "straight_through": False,
            "recovery": "mean",
            "pruned_forward": 0.75,
            "pruned_forward_until": 352,
            "hyperspherical": False,
            "penalty_weight": 30.0,
        },
        0.6,
    ),
    "cifar10_finetune_pof_bn.yaml": (
        {
            "scope": "global",
            "straight_through": False,
            "recovery": "mean",
            "pruned_forward": 0.5,
            "pruned_forward_until": 0,
            "hyperspherical": True,
            "penalty_weight": 0.0,
        },
        0.6,
    ),
    "cifar10_finetune_pof_convnext.yaml": (
        {
            "scope": "lamp",
            "straight_through": True,
            "recovery": "mean",
            "pruned_forward": 1.0,
            "pruned_forward_loss_weight": 0.5,
            "pruned_forward_sparsities": [0.5, 0.7, 0.9],
            "pruned_forward_until": 352,
            "hyperspherical": False,
            "penalty_every": 4,
            "penalty_weight": 30.0,
        },
        0.5,
    ),
}


BASES = {"cifar10_finetune_pof.yaml": "base_cache", "cifar10_finetune_pof_convnext.yaml": "base_cache_convnext_atto"}


@pytest.mark.parametrize("recipe_name", sorted(BASES))
def test_finetune_recipe_holds_out_what_its_base_held_out(recipe_name: str):
    """A hold-out drawn with another seed than the base's would be mostly images the base trained on."""
    recipe = yaml.safe_load((REPO / "recipes" / "configs" / recipe_name).read_text())
    base = json.loads((REPO / "bench" / BASES[recipe_name] / "base_recipe.json").read_text())
    assert recipe["model"] == f"local-dir:bench/{BASES[recipe_name]}"
    assert (recipe["validation_split"], recipe["validation_fraction"]) == (
        base["validation_split"],
        base["validation_fraction"],
    )
    assert recipe["split_seed"] == base["seed"]


@requires_cifar10
@pytest.mark.parametrize("recipe_name", sorted(FINETUNE_RECIPES))
def test_finetune_recipe_starts_from_the_committed_base_with_its_pof_settings(tmp_path: Path, recipe_name: str):
    expected, min_dense = FINETUNE_RECIPES[recipe_name]
    out = tmp_path / "finetuned"
    recipe = REPO / "recipes" / "configs" / recipe_name
    # Not TINY: its method and sparsity flags would override the recipe's.
    small = ["--max_train_steps", "2", "--max_train_samples", "512", "--max_eval_samples", "200", "--bn_batches", "2"]
    small += ["--num_workers", "0", "--report_to", "none"]
    run_recipe(["--config", str(recipe), "--output_dir", str(out)], tmp_path, tiny=small, timeout=300)
    summary = json.loads((out / "metrics.json").read_text())
    config = summary["prune_config"]
    assert {key: config[key] for key in expected} == expected
    assert config["penalty_sparsities"] == [0.5, 0.7, 0.9, 0.95]
    assert abs(summary["final"]["sparsity"] - 0.9) < 1e-3
    assert summary["final"]["accuracy_dense"] > min_dense, summary["final"]
