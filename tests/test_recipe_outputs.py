"""What the recipe leaves behind (issue 16): the saved data config, output folders that are never silently
overwritten, default folder names from the settings used, a checkpoint limit, and ``--push_to_hub`` that fails
before training when the Hub cannot take the model, or keeps everything local when the final push fails.

Tiny runs as in test_recipe.py (``test_resnet`` at 16 px on a few dozen digits); no network."""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import pytest
import timm
from timm.data import resolve_data_config

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "recipes"))

import recipe_args  # noqa: E402
from recipe_utils import prune_checkpoints  # noqa: E402
from test_recipe import SINGLE, TINY, check_ok, launch  # noqa: E402


def test_run_saves_its_data_config_limits_checkpoints_and_refuses_to_overwrite(tmp_path: Path) -> None:
    out = tmp_path / "run"
    flags = [*TINY, "--max_train_steps", "4", "--checkpointing_steps", "1", "--checkpoints_total_limit", "2"]
    result = launch([*flags, "--output_dir", str(out)], tmp_path)
    check_ok(result)
    # Item 6: the evaluations after training show progress bars (main process, stderr).
    assert all(f"eval {name}" in result.stderr for name in ("dense", "pruned", "recovered")), result.stderr[-2000:]

    # Item 1: config.json says what the model was trained with, and names no checkpoint it never used.
    config = json.loads((out / "config.json").read_text())
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [3, 16, 16] and cfg["crop_pct"] == 1.0 and cfg["num_classes"] == 10
    assert not {"tag", "hf_hub_id", "url", "license"} & set(cfg), cfg
    assert config["label_names"] == [str(i) for i in range(10)]
    assert json.loads((out / "pruning_config.json").read_text())["base_model"] is None
    assert json.loads((out / "metrics.json").read_text())["final"]["dataset"] == "digits"
    stock = timm.create_model(f"local-dir:{out}", pretrained=True)
    assert resolve_data_config({}, model=stock)["input_size"] == (3, 16, 16)

    # Item 5: four checkpoints were written, the newest two are kept.
    assert sorted(os.listdir(out / "checkpoints")) == ["step_3", "step_4"]

    # Item 4: the folder now holds a run; a new run is refused before it writes anything.
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    refused = launch([*TINY, "--max_train_steps", "1", "--output_dir", str(out)], tmp_path, timeout=120)
    assert refused.returncode != 0
    assert "error: --output_dir" in refused.stderr and "--overwrite_output_dir" in refused.stderr, refused.stderr
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before

    # --overwrite_output_dir: the new run's log holds its own lines only, the old checkpoints are gone.
    check_ok(launch([*TINY, "--max_train_steps", "1", "--overwrite_output_dir", "--output_dir", str(out)], tmp_path))
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert sum("config" in r for r in logged) == 1 and logged[-1]["step"] == 1
    assert not (out / "checkpoints").exists()


def test_prune_checkpoints_keeps_the_newest(tmp_path: Path) -> None:
    for i, name in enumerate(["step_2", "step_10", "epoch_0", "step_4"]):
        (tmp_path / name).mkdir()
        os.utime(tmp_path / name, (1000 + i, 1000 + i))
    removed = prune_checkpoints(str(tmp_path), 2)
    assert sorted(os.path.basename(p) for p in removed) == ["step_10", "step_2"]
    assert sorted(os.listdir(tmp_path)) == ["epoch_0", "step_4"]


@pytest.mark.parametrize(
    ("flags", "name"),
    [
        ([], "digits-resnet10t-pof-70"),
        (["--sparsity", "0.8"], "digits-resnet10t-pof-80"),
        (["--sparsity", "0.875", "--method", "magnitude"], "digits-resnet10t-magnitude-87.5"),
        (["--method", "autobot"], "digits-resnet10t-autobot-flops50"),  # AutoBot prunes to a FLOPs target
        (["--method", "autobot", "--flops_target", "0.3"], "digits-resnet10t-autobot-flops30"),
        (["--dataset", "../shared/datasets/cifar10/"], "cifar10-resnet10t-pof-70"),
    ],
)
def test_default_output_dir_follows_the_settings_used(flags: list[str], name: str) -> None:
    assert recipe_args.parse_args(flags).output_dir == os.path.join("runs", name)


def test_yaml_recipes_name_no_output_dir_of_their_own(tmp_path: Path) -> None:
    # A YAML's output_dir would outlive an edit of its sparsity on the command line (a "-pof-90" folder at 0.8).
    recipe = HERE.parent / "recipes" / "configs" / "cifar10_resnet18_pof.yaml"
    args = recipe_args.parse_args(["--config", str(recipe), "--sparsity", "0.8"])
    assert args.output_dir == os.path.join("runs", "cifar10-resnet18-pof-80")


def test_push_to_unreachable_hub_fails_before_training(tmp_path: Path) -> None:
    out = tmp_path / "never"
    env = {"HF_ENDPOINT": "http://127.0.0.1:1", "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token"}
    flags = [*TINY, "--max_train_steps", "1", "--push_to_hub", "--hub_model_id", "tester/x", "--output_dir", str(out)]
    result = launch(flags, tmp_path, env_update=env, timeout=180)
    assert result.returncode != 0
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "could not push 'tester/x'" in errors[0], result.stderr[-3000:]
    assert "Traceback" not in result.stderr.split(errors[0])[0]  # the error line comes before any traceback
    assert "train:" not in result.stderr and not out.exists()


def test_failed_final_push_keeps_the_outputs_and_says_how_to_retry(tmp_path: Path, monkeypatch) -> None:
    import hub_server
    from hub_server import FakeHub

    # The repo can be created (the check before training passes), but the commit is refused.
    monkeypatch.setattr(
        hub_server._Handler, "_commit", lambda self, repo, branch, body: self._error(403, "Forbidden", "no quota")
    )
    out = tmp_path / "kept"
    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token"}
        flags = [*TINY, "--max_train_steps", "1", "--report_to", "none", "--output_dir", str(out)]
        # --quiet: accelerate >= 1.16 otherwise repeats the recipe's stderr in its own traceback.
        args = [*flags, "--push_to_hub", "--hub_model_id", "tester/kept"]
        result = launch(args, tmp_path, launcher=[*SINGLE, "--quiet"], env_update=env)
        assert "tester/kept" in hub.repos  # created before training
    assert result.returncode == 1
    assert "| pruned" in result.stdout, result.stdout[-2000:]  # the results table is printed
    for name in ("config.json", "model.safetensors", "pruning_config.json", "metrics.json"):
        assert (out / name).is_file(), name
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["hub_url"] is None and "could not push 'tester/kept'" in metrics["hub_error"]
    line = [ln for ln in result.stderr.splitlines() if ln.startswith("error: the push failed")]
    assert len(line) == 1 and f"timm-prune push {out} tester/kept" in line[0], result.stderr[-3000:]


def test_run_header_names_what_the_method_prunes_to() -> None:
    import train  # recipes/train.py

    import timm_prune

    assert train.pruning_goal(timm_prune.PruneConfig(method="autobot", flops_target=0.4)) == "to 0.4 of the FLOPs"
    assert train.pruning_goal(timm_prune.PruneConfig(method="pof", sparsity=0.8)) == "at sparsity 0.8"
