"""The training recipe, launched the way users launch it: ``accelerate launch recipes/train.py``.

Tiny runs (timm's ``test_resnet`` at 16 px on a few dozen of scikit-learn's digits, a handful of optimizer
steps) so that the whole file stays within a few minutes on 2 CPU cores. No network: HF_HUB_OFFLINE=1.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import timm
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
RECIPES = REPO / "recipes"
sys.path.insert(0, str(RECIPES))
sys.path.insert(0, str(REPO / "tests"))

import recipe_args  # noqa: E402  (recipes/ is a folder of scripts, not a package)
from shared_data import CIFAR10, requires_cifar10  # noqa: E402

import timm_prune  # noqa: E402
from timm_prune.data import ImageClassificationDataset, create_transforms, load_image_splits  # noqa: E402

TINY = [
    "--model", "test_resnet", "--img_size", "16", "--batch_size", "16", "--max_train_samples", "64",
    "--max_eval_samples", "32", "--num_workers", "0", "--bn_batches", "2",
]  # fmt: skip
SINGLE = ["--num_processes", "1", "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no"]
TWO_CPU_PROCESSES = ["--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision", "no"]
TWO_CPU_PROCESSES += ["--dynamo_backend", "no", "--main_process_port", "29533"]


def launch(
    args: list[str],
    tmp_path: Path,
    launcher: list[str] = SINGLE,
    timeout: int = 240,
    env_update: dict[str, str] | None = None,
) -> subprocess.CompletedProcess:
    # The user's HF_* settings (tokens, endpoints, caches) must not leak into a test run.
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    env.update(
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        HF_DATASETS_CACHE=str(tmp_path / "hf_datasets_cache"),
        OMP_NUM_THREADS="1",  # two processes on two cores: no oversubscription
        ACCELERATE_USE_CPU="1",
    )
    env.update(env_update or {})
    command = [sys.executable, "-m", "accelerate.commands.launch", *launcher, str(RECIPES / "train.py"), *args]
    return subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def check_ok(result: subprocess.CompletedProcess) -> None:
    assert result.returncode == 0, (
        f"exit {result.returncode}\nstdout:\n{result.stdout[-4000:]}\nstderr:\n{result.stderr[-4000:]}"
    )


def test_single_process_run_trains_prunes_saves_and_prints_table(tmp_path: Path) -> None:
    out = tmp_path / "run"
    recipe = tmp_path / "recipe.yaml"
    # YAML sets the sparsity and epochs; the command line overrides the sparsity (command line wins).
    recipe.write_text("sparsity: 0.5\nepochs: 2\nlr: 1e-2\nthreshold_refresh: 2\n")
    result = launch([*TINY, "--config", str(recipe), "--sparsity", "0.7", "--output_dir", str(out)], tmp_path)
    check_ok(result)

    for name in ("config.json", "model.safetensors", "pruning_config.json", "metrics.json", "logs/metrics.jsonl"):
        assert (out / name).is_file(), f"{name} missing; output dir holds {sorted(os.listdir(out))}"
    assert any((out / "logs" / "tensorboard").rglob("events.out.tfevents.*")), "no TensorBoard event file"

    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    for key in ("accuracy_dense", "accuracy_pruned", "accuracy_recovered", "accuracy_bn_recalibrated"):
        assert 0.0 <= final[key] <= 1.0, (key, final[key])
    assert len(metrics["history"]) == 2  # epochs: 2 from the YAML
    assert abs(metrics["prune_config"]["sparsity"] - 0.7) < 1e-9  # the flag, not the YAML's 0.5
    assert metrics["prune_config"]["threshold_refresh"] == 2  # a method field from the YAML
    assert metrics["args"]["lr"] == pytest.approx(1e-2)  # YAML's "1e-2" read as a number
    for record in metrics["history"]:
        for key in ("train_loss", "penalty", "candidate_energy_mean", "candidate_energy_max", "val_accuracy"):
            assert isinstance(record[key], float), (key, record)
    logged = [json.loads(line) for line in (out / "logs" / "metrics.jsonl").read_text().splitlines()]
    assert sum("val_accuracy" in r for r in logged) == 2

    # The saved weights are pruned: the targeted convs hold 70% exact zeros together (POF's default scope, LAMP:
    # one threshold, so the layers differ, none emptied), the stem conv none.
    assert metrics["prune_config"]["scope"] == "lamp"
    weights = load_file(out / "model.safetensors")
    convs = {k: v for k, v in weights.items() if v.dim() == 4}
    assert float((convs.pop("conv1.0.weight") == 0).float().mean()) < 0.05  # the stem (pretrained_cfg first_conv)
    zeros = sum(int((v == 0).sum()) for v in convs.values())
    assert convs and abs(zeros / sum(v.numel() for v in convs.values()) - 0.7) < 0.01
    assert all(float((v == 0).float().mean()) < 1.0 for v in convs.values())

    table = result.stdout
    assert "| model" in table and "| accuracy |" in table
    for row in ("dense (trained)", "pruned + mean recovery", "pruned + BN re-estimated (2 batches)"):
        assert row in table, table[-2000:]
    assert f"{100 * final['accuracy_pruned']:.2f}%" in table


def test_two_cpu_processes_really_run_as_two_ranks_and_agree(tmp_path: Path) -> None:
    out = tmp_path / "ddp"
    result = launch([*TINY, "--max_train_steps", "3", "--output_dir", str(out)], tmp_path, TWO_CPU_PROCESSES)
    check_ok(result)
    ranks = re.findall(r"\[rank (\d)/(\d)\] world_size=(\d) masks_sha256=(\w+) weights_sha256=(\w+)", result.stdout)
    assert sorted(r[0] for r in ranks) == ["0", "1"], result.stdout[-3000:]
    assert all(r[1] == "2" and r[2] == "2" for r in ranks)
    assert ranks[0][3] == ranks[1][3], "masks differ between ranks"
    assert ranks[0][4] == ranks[1][4], "pruned weights differ between ranks"
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["world_size"] == 2 and metrics["masks_sha256"] == ranks[0][3]
    # Each rank trained on its own half: 64 images / (2 ranks x 16) = 2 steps an epoch, 3 steps in all.
    assert [r["step"] for r in metrics["history"]] == [2, 3]


def test_autobot_run_trains_gates_removes_channels_and_saves(tmp_path: Path) -> None:
    out = tmp_path / "autobot"
    flags = [*TINY, "--method", "autobot", "--flops_target", "0.5", "--num_batches", "3", "--gate_batch_size", "8"]
    flags += ["--latency_runs", "0", "--max_train_steps", "2", "--report_to", "none", "--output_dir", str(out)]
    result = launch(flags, tmp_path)
    check_ok(result)
    assert "calibration (autobot): 3 steps" in result.stdout and "of the FLOPs" in result.stdout
    metrics = json.loads((out / "metrics.json").read_text())
    final = metrics["final"]
    assert 0.48 <= final["flops_ratio"] <= 0.5, final  # exact FLOPs selection lands just under the target
    assert "accuracy_recovered" not in final  # no masked entries to recover: the channels are gone
    dense = timm.create_model("test_resnet", num_classes=10)  # the digits have 10 classes
    loaded = timm_prune.from_pretrained(str(out))
    assert sum(p.numel() for p in loaded.parameters()) < sum(p.numel() for p in dense.parameters())
    with torch.no_grad():
        assert loaded(torch.randn(2, 3, 16, 16)).shape == (2, 10)


def test_resume_from_checkpoint_reaches_the_uninterrupted_weights(tmp_path: Path) -> None:
    # 64 images / 16 = 4 steps an epoch, 8 steps; random (seeded) augmentation stays on. threshold_refresh 3:
    # checkpoints at steps 2 and 4 fall between refreshes, so POF's candidate set must come back from them.
    common = [*TINY, "--max_train_steps", "8", "--checkpointing_steps", "2", "--report_to", "none"]
    common += ["--threshold_refresh", "3"]
    full, parts = tmp_path / "full", tmp_path / "parts"
    check_ok(launch([*common, "--output_dir", str(full)], tmp_path))

    first = launch([*common, "--output_dir", str(parts), "--stop_after_step", "2"], tmp_path)
    check_ok(first)
    assert (parts / "checkpoints" / "step_2").is_dir() and not (parts / "model.safetensors").exists()
    # Mid-epoch (step 2 of 4), then an epoch boundary (step 4 of 4), then "latest" to the end.
    second = [*common, "--output_dir", str(parts), "--resume_from_checkpoint", str(parts / "checkpoints" / "step_2")]
    check_ok(launch([*second, "--stop_after_step", "4"], tmp_path))
    check_ok(launch([*common, "--output_dir", str(parts), "--resume_from_checkpoint", "latest"], tmp_path))

    a, b = load_file(full / "model.safetensors"), load_file(parts / "model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    ma, mb = (json.loads((d / "metrics.json").read_text()) for d in (full, parts))
    assert ma["history"] == mb["history"]  # same epoch losses, penalties and accuracies
    assert ma["masks_sha256"] == mb["masks_sha256"]


def test_push_to_hub_from_the_recipe_is_one_commit(tmp_path: Path) -> None:
    from hub_server import FakeHub  # the suite's stand-in for the Hub (tests/hub_server.py)

    out = tmp_path / "pushed"
    with FakeHub() as hub:
        env = {"HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_TOKEN": "hf_test_token"}
        flags = [*TINY, "--max_train_steps", "1", "--report_to", "none", "--output_dir", str(out)]
        flags += ["--push_to_hub", "--hub_model_id", "tester/recipe-pof"]
        result = launch(flags, tmp_path, env_update=env)
        check_ok(result)
        commits = hub.commits("tester/recipe-pof")
    assert {"config.json", "model.safetensors", "pruning_config.json", "README.md"} <= set(commits[0].files)
    assert commits[0].files["model.safetensors"] == (out / "model.safetensors").read_bytes()
    url = json.loads((out / "metrics.json").read_text())["hub_url"]
    assert url == f"{hub.url}/tester/recipe-pof/commit/{commits[0].sha}" and url in result.stdout


@pytest.mark.parametrize(
    ("flags", "message"),
    [
        (["--model", "resnet_does_not_exist"], "--model 'resnet_does_not_exist' is not a timm model name"),
        (["--label_column", "no_such_column"], "--label_column 'no_such_column' is not a column"),
        (["--sparsity", "1.5"], "PruneConfig.sparsity must be a number in [0, 1)"),
        (["--dataset", "./no/such/dataset"], "--dataset './no/such/dataset' does not exist"),
    ],
)
def test_bad_arguments_fail_before_training_and_leave_no_output_dir(
    tmp_path: Path, flags: list[str], message: str
) -> None:
    out = tmp_path / "never"
    result = launch([*TINY, *flags, "--output_dir", str(out)], tmp_path, timeout=120)
    assert result.returncode != 0
    assert f"error: {message}" in result.stderr, result.stderr[-3000:]
    assert "train:" not in result.stderr  # no progress bar: training never started
    assert not out.exists()


# ---------------------------------------------------------------------------- in-process (fast) checks
def test_yaml_recipes_parse_and_build_valid_configs() -> None:
    configs = sorted(RECIPES.glob("configs/*.yaml"))
    names = {c.stem for c in configs}
    assert {"default", "cifar10_resnet18_pof"} <= names and any("vit" in n for n in names), names
    for path in configs:
        args = recipe_args.parse_args(["--config", str(path)])
        if args.method not in timm_prune.list_methods():
            continue
        config = recipe_args.prune_config_from_args(args)
        # A method that ignores sparsity (AutoBot: a FLOPs target) does not carry it (PruneMethod.unused_fields).
        ignored = "sparsity" in timm_prune.methods.get_method(args.method).unused_fields
        assert config.method == args.method and config.sparsity == (None if ignored else args.sparsity)


def test_default_yaml_is_the_no_argument_run() -> None:
    bare = vars(recipe_args.parse_args([]))
    written = vars(recipe_args.parse_args(["--config", str(RECIPES / "configs" / "default.yaml")]))
    bare.pop("config"), written.pop("config")
    assert bare == written


@pytest.mark.parametrize(
    ("argv", "scope"),
    [
        ([], "lamp"),
        (["--method", "magnitude"], "lamp"),
        (["--method", "wanda"], "layer"),
        (["--pattern", "2:4"], "layer"),
        (["--scope", "global"], "global"),
    ],
)
def test_scope_left_unset_is_the_methods_default_written_out(argv: list[str], scope: str) -> None:
    args = recipe_args.parse_args(argv)
    assert args.scope == scope  # saved with the run's arguments as the value used, never None
    assert recipe_args.prune_config_from_args(args).scope == scope


def test_method_fields_are_flags_for_every_registered_method() -> None:
    import dataclasses

    from timm_prune.methods import get_method

    parser = recipe_args.build_parser()
    dests = {a.dest for a in parser._actions}
    for method in timm_prune.list_methods():
        for field in dataclasses.fields(get_method(method).options_cls):
            assert field.name in dests, (method, field.name)
    args = recipe_args.parse_args(["--penalty_warmup", "7", "--criterion", "weight"])
    config = recipe_args.prune_config_from_args(args)
    assert config.penalty_warmup == 7 and config.criterion == "weight"


def test_config_errors_name_the_problem(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("sparsty: 0.5\n")
    with pytest.raises(SystemExit):
        recipe_args.parse_args(["--config", str(bad)])
    assert "unknown key(s) ['sparsty']" in capsys.readouterr().err
    with pytest.raises(ValueError, match="penalty_warmup"):
        recipe_args.prune_config_from_args(recipe_args.parse_args(["--penalty_warmup", "-3"]))


def test_builtin_digits_and_seeded_augmentation() -> None:
    import random

    import timm

    splits = load_image_splits("digits", validation_fraction=0.2, seed=0)
    assert (splits.image_column, splits.label_column, splits.num_classes) == ("image", "label", 10)
    assert len(splits.train) + len(splits.validation) == 1797
    model = timm.create_model("test_resnet", num_classes=10)
    train_tf, _, data_config = create_transforms(model, 16, 1.0, {"hflip": 0.0, "scale": (0.5, 1.0)})
    assert data_config["input_size"] == (3, 16, 16)
    ds = ImageClassificationDataset(splits.train, "image", "label", train_tf, seed=3)
    torch_state, python_state = torch.get_rng_state(), random.getstate()
    x0, y0 = ds[5]
    assert x0.shape == (3, 16, 16) and 0 <= y0 < 10
    assert torch.equal(ds[5][0], x0)  # a function of (seed, epoch, index) ...
    ds.set_epoch(1)
    assert not torch.equal(ds[5][0], x0)  # ... that changes with the epoch
    assert torch.equal(torch.get_rng_state(), torch_state) and random.getstate() == python_state


@requires_cifar10
def test_cifar10_parquet_directory_columns_are_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import datasets

    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))  # read at load time
    splits = load_image_splits(str(CIFAR10), max_train_samples=100, max_eval_samples=50, seed=0)
    assert (splits.image_column, splits.label_column) == ("img", "label")
    assert splits.num_classes == 10 and splits.validation_source == "test"
    assert len(splits.train) == 100 and len(set(splits.train["label"])) > 3  # a random subset, not one class
