"""Smaller things a new user hit (issue 16, item 10): ``timm-prune info`` on a truncated weights file, file
modes of a saved model, a random ``*.bin`` taken for a pickle checkpoint, and push errors that say "push"."""

from __future__ import annotations

import os
import stat

import huggingface_hub
import pytest
import timm
import torch

import timm_prune
from timm_prune import FileFormatError, HubUnreachableError
from timm_prune.cli import main as cli_main


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


@pytest.fixture
def saved(tmp_path) -> str:
    torch.manual_seed(0)
    pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=3), timm_prune.PruneConfig(sparsity=0.5))
    pm.prune()
    return pm.save_pretrained(tmp_path / "model")


def test_info_on_a_truncated_weights_file_fails(saved, capsys):
    path = os.path.join(saved, "model.safetensors")
    data = open(path, "rb").read()
    with open(path, "wb") as f:
        f.write(data[: len(data) // 2])
    assert cli_main(["info", saved]) != 0
    err = capsys.readouterr().err
    assert "model.safetensors" in err and "truncated" in err


def test_saved_files_follow_the_umask(tmp_path):
    old = os.umask(0o022)
    try:
        pm = timm_prune.convert(timm.create_model("test_resnet", num_classes=3), timm_prune.PruneConfig())
        path = pm.save_pretrained(tmp_path / "shared")
    finally:
        os.umask(old)
    assert stat.S_IMODE(os.stat(path).st_mode) == 0o755
    for name in os.listdir(path):
        assert stat.S_IMODE(os.stat(os.path.join(path, name)).st_mode) == 0o644, name


def test_a_random_bin_file_is_not_called_a_pickle_checkpoint(saved):
    os.remove(os.path.join(saved, "model.safetensors"))
    with open(os.path.join(saved, "vocab.bin"), "wb") as f:
        f.write(os.urandom(64).replace(b"\x80", b"\x00").replace(b"PK", b"pk"))
    with pytest.raises(FileFormatError) as error:
        timm_prune.from_pretrained(saved)
    assert "pickle" not in str(error.value) and "model.safetensors" in str(error.value)


def test_push_errors_say_push(saved, monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:1")
    monkeypatch.setattr("time.sleep", lambda seconds: None)  # huggingface_hub's retry back-off
    with pytest.raises(HubUnreachableError, match="could not push 'tester/x' to the Hugging Face Hub"):
        timm_prune.hub.check_push_access("tester/x", token="hf_test_token")


def test_structured_card_names_the_library_that_loads_it(tmp_path):
    import yaml

    fixture = os.path.join(os.path.dirname(__file__), "fixtures", "pre_move_autobot")
    path = timm_prune.from_pretrained(fixture).save_pretrained(tmp_path / "narrowed")
    card = open(os.path.join(path, "README.md")).read()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "timm_prune"  # stock timm cannot build it
    assert 'timm_prune.from_pretrained("' in card
