"""Hub round trips: save_pretrained / from_pretrained / push_to_hub, the model card, the compact format,
file safety and ``timm-prune push`` (the other CLI commands: test_cli.py). Nothing here reaches the real Hub:
local directories, the offline switch, or ``tests/hub_server.py`` on 127.0.0.1 (driven from a subprocess, since
huggingface_hub reads HF_ENDPOINT at import time)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import subprocess
import sys
import textwrap

import huggingface_hub
import pytest
import timm
import torch
import yaml
from safetensors.torch import load_file, save_file

import timm_prune
from timm_prune import FileFormatError, HubUnreachableError

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
from hub_server import FakeHub  # noqa: E402

FILES = {
    "README.md",
    "config.json",
    "mean_recovery.safetensors",
    "model.safetensors",
    "pruning_config.json",
    "pruning_plot.png",
}


@pytest.fixture(autouse=True)
def _offline(monkeypatch):
    # conftest sets HF_HUB_OFFLINE before import; make sure no in-process call can reach a network.
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def _make(kind: str, sparsity: float = 0.6) -> tuple[timm_prune.PrunableModel, torch.Tensor]:
    torch.manual_seed(0)
    if kind == "cnn":
        model, x = timm.create_model("test_resnet", num_classes=7), torch.randn(2, 3, 32, 32)
    else:
        model, x = timm.create_model("test_vit", num_classes=10, img_size=32), torch.randn(2, 3, 32, 32)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(method="pof", sparsity=sparsity))
    pm.prune()
    pm.recover("mean")
    pm.metrics = {"accuracy_dense": 0.91, "accuracy_pruned": 0.52, "accuracy_recovered": 0.83, "dataset": "digits"}
    return pm.eval(), x


@pytest.fixture(scope="module")
def saved_cnn(tmp_path_factory):
    pm, x = _make("cnn")
    path = str(tmp_path_factory.mktemp("cnn") / "model")
    pm.save_pretrained(path)
    return pm, x, path


def _copy(src: str, tmp_path) -> str:
    dst = str(tmp_path / "copy")
    shutil.copytree(src, dst)
    return dst


# ================================================================================================ local
@pytest.mark.parametrize("kind", ["cnn", "vit"])
def test_local_round_trip_all_loaders_agree(kind, tmp_path):
    from transformers import AutoModelForImageClassification

    pm, x = _make(kind)
    path = str(tmp_path / kind)
    assert pm.save_pretrained(path) == path
    assert set(os.listdir(path)) == FILES

    with torch.no_grad():
        recovered = pm(x)
        plain = pm.merge_and_unload().eval()
        pruned = plain(x)
    assert not torch.allclose(recovered, pruned, atol=1e-4)  # recovery changes outputs: the checks below bite

    weights = load_file(os.path.join(path, "model.safetensors"))
    for name, keep in pm.masks.items():
        assert torch.equal(weights[f"{name}.weight"] == 0, ~keep)  # pruned entries exactly 0, kept ones not
    config = json.load(open(os.path.join(path, "config.json")))
    assert "num_classes" not in config.get("model_args", {})  # transformers' TimmWrapper trap
    pruning = json.load(open(os.path.join(path, "pruning_config.json")))
    assert pruning["schema_version"] == 1 and pruning["library_version"] == timm_prune.__version__
    assert pruning["config"] == pm.config.to_dict() and pruning["recovery"] == "mean"
    assert pruning["base_model"] == plain.pretrained_cfg["hf_hub_id"]
    assert pruning["report"] == pm.last_report.to_dict() and pruning["metrics"]["accuracy_pruned"] == 0.52

    loaded = timm_prune.from_pretrained(path)
    assert loaded.recovery == "mean" and not loaded.training
    assert loaded.metrics == pm.metrics and loaded.last_report.to_dict() == pm.last_report.to_dict()
    assert set(loaded.masks) == set(pm.masks)
    assert all(torch.equal(loaded.masks[n], pm.masks[n]) for n in pm.masks)
    rt, rt_ref = loaded.recovery_tensors(), pm.recovery_tensors()
    assert set(rt) == set(rt_ref) and all(torch.equal(rt[k], rt_ref[k]) for k in rt)
    no_recovery = timm_prune.from_pretrained(f"local-dir:{path}", recover=False)
    stock = timm.create_model(f"local-dir:{path}", pretrained=True).eval()
    hf = AutoModelForImageClassification.from_pretrained(path).eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), recovered, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(no_recovery(x), pruned, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(stock(x), pruned, atol=0, rtol=0)
        # TimmWrapper runs the same weights through its own wrapper: equal up to float reassociation.
        torch.testing.assert_close(hf(pixel_values=x).logits, pruned, atol=1e-6, rtol=1e-5)
        # Every recovery kind is stored, not only the active one.
        renorm = timm_prune.from_pretrained(path, recover="renorm")
        pm.recover("renorm")
        torch.testing.assert_close(renorm(x), pm(x), atol=1e-5, rtol=1e-5)
    pm.recover("mean")


def test_model_card_metadata_and_plot(saved_cnn):
    pm, _, path = saved_cnn
    card = huggingface_hub.ModelCard.load(os.path.join(path, "README.md"))
    data = card.data.to_dict()
    assert data["library_name"] == "timm" and data["base_model"] == "timm/test_resnet.r160_in1k"
    assert {"timm_prune", "pruning-pof"} <= set(data["tags"])
    metrics = data["model-index"][0]["results"][0]["metrics"]
    assert [m["value"] for m in metrics] == [0.91, 0.52, 0.83]
    text = card.text
    assert 'timm.create_model("hf-hub:' in text and "AutoModelForImageClassification" in text
    assert "timm_prune.from_pretrained(" in text and "![Per-layer sparsity](pruning_plot.png)" in text
    assert f"{pm.last_report.sparsity * 100:.2f}%" in text and "| pruned | 52.00% |" in text
    assert all(f"`{layer.name}`" in text for layer in pm.last_report.layers)
    with open(os.path.join(path, "pruning_plot.png"), "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"


def test_card_template_has_one_copy():
    # One template, shipped as package data (editable installs and wheels read the same file); hub_cards/ says
    # where it is instead of holding a second copy that could drift.
    from timm_prune.hub.card import template_path

    assert os.path.isfile(template_path())
    copies = []
    for directory, subdirs, files in os.walk(ROOT):
        subdirs[:] = [d for d in subdirs if not d.startswith(".") and d not in ("build", "dist", "runs", "outputs")]
        copies += [os.path.join(directory, f) for f in files if f == "model_card.md"]
    assert [os.path.realpath(c) for c in copies] == [os.path.realpath(template_path())]
    with open(os.path.join(ROOT, "hub_cards", "README.md")) as f:
        assert "timm_prune/hub/templates/model_card.md" in f.read()


# ================================================================================================ compact
def test_compact_is_small_and_reloads_exactly(tmp_path):
    pm, x = _make("cnn", sparsity=0.7)
    # A kept weight that happens to be 0 must stay kept: masks are stored, not guessed from zeros.
    name = next(iter(pm.targets))
    module = pm.targets[name]
    keep = pm.masks[name]
    index = keep.reshape(-1).nonzero()[0, 0]
    pm.recover("none")  # set the plain pruned weight, then put the recovery back
    with torch.no_grad():
        weight = module.weight.detach().clone()
        weight.view(-1)[index] = 0.0
        module.weight = weight
        assert bool(pm.masks[name].reshape(-1)[index]) and float(module.weight.reshape(-1)[index]) == 0.0
    pm.recover("mean")

    dense, compact = str(tmp_path / "dense"), str(tmp_path / "compact")
    pm.save_pretrained(dense)
    pm.save_pretrained(compact, save_format="compact")
    assert "model.safetensors" not in os.listdir(compact) and "model_compact.safetensors" in os.listdir(compact)
    ratio = os.path.getsize(f"{compact}/model_compact.safetensors") / os.path.getsize(f"{dense}/model.safetensors")
    assert ratio <= 0.36, ratio
    assert "Compact format" in open(f"{compact}/README.md").read()

    a, b = timm_prune.from_pretrained(dense), timm_prune.from_pretrained(compact)
    sa, sb = a.merge_and_unload().state_dict(), b.merge_and_unload().state_dict()
    assert sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    for loaded in (a, b):
        assert all(torch.equal(loaded.masks[n], pm.masks[n]) for n in pm.masks)
    with torch.no_grad():
        torch.testing.assert_close(b(x), pm(x), atol=1e-5, rtol=1e-5)
        assert torch.equal(a(x), b(x))


# ================================================================================================ atomic
def test_failed_save_leaves_nothing(tmp_path, monkeypatch):
    pm, _ = _make("cnn")
    target = tmp_path / "out"

    def broken(tensors, path, metadata=None):
        with open(path, "wb") as f:
            f.write(b"half")
        raise OSError("disk full")

    monkeypatch.setattr("timm_prune.hub.save.save_file", broken)
    with pytest.raises(OSError, match="disk full"):
        pm.save_pretrained(str(target))
    assert os.listdir(tmp_path) == []  # no target, no staging directory


def test_invalid_input_is_refused_before_writing(tmp_path):
    pm, _ = _make("cnn")
    with pytest.raises(ValueError, match="save_format"):
        pm.save_pretrained(str(tmp_path / "a"), save_format="zip")
    pm.metrics["bad"] = object()
    with pytest.raises(ValueError, match=r"metrics\['bad'\]"):
        pm.save_pretrained(str(tmp_path / "b"))
    assert os.listdir(tmp_path) == []


def test_resave_replaces_own_files_and_keeps_others(tmp_path):
    pm, _ = _make("cnn")
    path = str(tmp_path / "m")
    pm.save_pretrained(path, save_format="compact")
    with open(os.path.join(path, "notes.txt"), "w") as f:
        f.write("mine")
    pm.save_pretrained(path)
    assert set(os.listdir(path)) == FILES | {"notes.txt"}  # the stale compact file is gone
    assert timm_prune.from_pretrained(path).is_pruned


# ================================================================================================ safety
def _rewrite_json(path: str, name: str, **changes) -> None:
    data = json.load(open(os.path.join(path, name)))
    for key, value in changes.items():
        if "." in key:
            outer, inner = key.split(".")
            data[outer][inner] = value
        else:
            data[key] = value
    json.dump(data, open(os.path.join(path, name), "w"))


def _truncate(path: str, name: str) -> None:
    with open(os.path.join(path, name), "rb") as f:
        data = f.read()
    with open(os.path.join(path, name), "wb") as f:
        f.write(data[: len(data) // 2])


BAD_FILES = {
    "schema": (lambda p: _rewrite_json(p, "pruning_config.json", schema_version=99), "pruning_config.json", "99"),
    "method": (
        lambda p: _rewrite_json(p, "pruning_config.json", **{"config.method": "magic"}),
        "pruning_config.json",
        "unknown pruning method 'magic'",
    ),
    "json": (lambda p: open(os.path.join(p, "pruning_config.json"), "w").write("{oops"), "pruning_config.json", "JSON"),
    "shape": (lambda p: _rewrite_json(p, "config.json", num_classes=5), "model.safetensors", "shape mismatch"),
    "truncated": (lambda p: _truncate(p, "model.safetensors"), "model.safetensors", "truncated"),
    "truncated_recovery": (
        lambda p: _truncate(p, "mean_recovery.safetensors"),
        "mean_recovery.safetensors",
        "truncated",
    ),
    "tampered": (
        lambda p: save_file(
            {
                k: torch.ones_like(v) if k.endswith("conv2.weight") else v
                for k, v in load_file(f"{p}/model.safetensors").items()
            },
            f"{p}/model.safetensors",
            metadata={"format": "pt"},
        ),
        "model.safetensors",
        "non-zero weights where it is pruned",
    ),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_file_gives_clear_error(case, saved_cnn, tmp_path):
    damage, filename, problem = BAD_FILES[case]
    path = _copy(saved_cnn[2], tmp_path)
    damage(path)
    with pytest.raises(FileFormatError) as info:
        timm_prune.from_pretrained(path)
    assert info.value.filename == filename and str(info.value).startswith(filename)
    assert problem in str(info.value)


class _Boom:
    def __reduce__(self):
        return (os.mkdir, (MARKER,))


MARKER = ""


def test_pickles_are_refused_never_loaded(saved_cnn, tmp_path):
    global MARKER
    MARKER = str(tmp_path / "unpickled")
    path = _copy(saved_cnn[2], tmp_path)
    os.remove(os.path.join(path, "model.safetensors"))
    with open(os.path.join(path, "pytorch_model.bin"), "wb") as f:
        pickle.dump(_Boom(), f)
    with pytest.raises(FileFormatError, match="pytorch_model.bin.*never unpickles"):
        timm_prune.from_pretrained(path)
    with pytest.raises(FileFormatError, match="pickle"):
        timm_prune.from_pretrained(os.path.join(path, "pytorch_model.bin"))
    os.remove(os.path.join(path, "pruning_config.json"))
    with pytest.raises(FileFormatError, match="pickle"):
        timm_prune.from_pretrained(path)
    assert not os.path.exists(MARKER)


def test_unreachable_hub_names_the_repo(tmp_path):
    with pytest.raises(HubUnreachableError, match="'someone/pruned-model'"):
        timm_prune.from_pretrained("someone/pruned-model", cache_dir=str(tmp_path))


def test_push_off_the_main_process_does_nothing(monkeypatch):
    pm, _ = _make("cnn")
    monkeypatch.setattr("timm_prune.hub.push.is_main_process", lambda: False)
    assert pm.push_to_hub("tester/never") is None


# ================================================================================================ Hub
_CLIENT = textwrap.dedent(
    """
    import contextlib, io, json, sys, time
    import timm, torch
    import huggingface_hub.constants as C
    from safetensors.torch import load_file, save_file
    from transformers import AutoModelForImageClassification
    import timm_prune
    from timm_prune.cli import main as cli_main

    work = sys.argv[1]
    ref = load_file(f"{work}/ref.safetensors")
    result, outputs = {}, {}
    pm = timm_prune.from_pretrained(f"{work}/cnn")
    result["url"] = pm.push_to_hub("tester/cnn-pof", private=True)
    result["url_compact"] = pm.push_to_hub("tester/cnn-pof", revision="compact", save_format="compact")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        result["cli_rc"] = cli_main(["push", f"{work}/vit", "tester/vit-pof", "--commit-message", "cli push"])
    result["cli_out"] = out.getvalue()

    with torch.no_grad():
        for name, repo in (("cnn", "tester/cnn-pof"), ("vit", "tester/vit-pof")):
            x = ref[f"{name}.x"]
            outputs[f"{name}.timm_prune"] = timm_prune.from_pretrained(repo)(x)
            outputs[f"{name}.timm_prune_plain"] = timm_prune.from_pretrained(f"hf-hub:{repo}", recover=False)(x)
            outputs[f"{name}.timm"] = timm.create_model(f"hf-hub:{repo}", pretrained=True).eval()(x)
            hf = AutoModelForImageClassification.from_pretrained(repo).eval()
            outputs[f"{name}.transformers"] = hf(pixel_values=x).logits
        outputs["cnn.compact"] = timm_prune.from_pretrained("tester/cnn-pof@compact")(ref["cnn.x"])
    errors = {}
    for label, repo in (("missing_repo", "tester/nothing"), ("missing_rev", "tester/cnn-pof@nope")):
        try:
            timm_prune.from_pretrained(repo)
        except Exception as e:
            errors[label] = f"{type(e).__name__}: {e}"
    C.HUGGINGFACE_CO_URL_TEMPLATE = "http://127.0.0.1:1/{repo_id}/resolve/{revision}/{filename}"  # nobody there
    time.sleep = lambda seconds: None  # skip huggingface_hub's 23 s of retry back-off (last step of this process)
    try:
        timm_prune.from_pretrained("tester/not-cached")
    except Exception as e:
        errors["unreachable"] = f"{type(e).__name__}: {e}"
    result["errors"] = errors
    save_file({k: v.contiguous() for k, v in outputs.items()}, f"{work}/out.safetensors")
    json.dump(result, open(f"{work}/result.json", "w"))
    """
)


@pytest.fixture(scope="module")
def hub_round_trip(tmp_path_factory):
    work = str(tmp_path_factory.mktemp("hub"))
    refs = {}
    for name in ("cnn", "vit"):
        pm, x = _make(name)
        pm.save_pretrained(os.path.join(work, name), repo_id=f"tester/{name}-pof")
        with torch.no_grad():
            refs[f"{name}.x"] = x
            refs[f"{name}.recovered"] = pm(x)
            refs[f"{name}.pruned"] = pm.merge_and_unload().eval()(x)
    save_file(refs, os.path.join(work, "ref.safetensors"))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("HF_", "HUGGINGFACE_"))}
    with FakeHub() as hub:
        env.update(
            HF_ENDPOINT=hub.url,
            HF_HOME=os.path.join(work, "hf_home"),
            HF_TOKEN="hf_test_token",
            HF_HUB_OFFLINE="0",
            HF_HUB_DISABLE_TELEMETRY="1",
            HF_HUB_DISABLE_PROGRESS_BARS="1",
            PYTHONPATH=os.pathsep.join([ROOT, env.get("PYTHONPATH", "")]),
        )
        proc = subprocess.run(
            [sys.executable, "-c", _CLIENT, work], env=env, capture_output=True, text=True, timeout=300
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        result = json.load(open(os.path.join(work, "result.json")))
        return hub, result, load_file(os.path.join(work, "out.safetensors")), refs


def test_push_is_one_commit_with_every_file(hub_round_trip):
    hub, result, _, _ = hub_round_trip
    commits = hub.commits("tester/cnn-pof")
    assert [c.message for c in commits][-1] == "initial commit" and len(commits) == 2
    assert result["url"] == f"{hub.url}/tester/cnn-pof/commit/{commits[0].sha}"
    assert FILES <= set(commits[0].files) and hub.repos["tester/cnn-pof"].private
    branch = hub.commits("tester/cnn-pof", "compact")
    assert result["url_compact"].endswith(branch[0].sha) and len(branch) == 3
    # The dense file was removed in the same commit that added the compact one.
    assert "model_compact.safetensors" in branch[0].files and "model.safetensors" not in branch[0].files
    vit = hub.commits("tester/vit-pof")
    assert result["cli_rc"] == 0 and vit[0].message == "cli push" and len(vit) == 2
    assert (
        result["cli_out"].strip()
        == f"pushed {result['cli_out'].split()[1]} to tester/vit-pof: {hub.url}/tester/vit-pof/commit/{vit[0].sha}"
    )
    card = vit[0].files["README.md"].decode()
    assert 'timm.create_model("hf-hub:tester/vit-pof", pretrained=True)' in card


@pytest.mark.parametrize("name", ["cnn", "vit"])
def test_hub_loaders_agree(hub_round_trip, name):
    hub, _, out, refs = hub_round_trip
    torch.testing.assert_close(out[f"{name}.timm_prune"], refs[f"{name}.recovered"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[f"{name}.timm_prune_plain"], refs[f"{name}.pruned"], atol=1e-5, rtol=1e-5)
    # Another process (other thread count, other kernels): equal up to float rounding, not bit for bit.
    torch.testing.assert_close(out[f"{name}.timm"], refs[f"{name}.pruned"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(out[f"{name}.transformers"], refs[f"{name}.pruned"], atol=1e-5, rtol=1e-5)
    if name == "cnn":
        torch.testing.assert_close(out["cnn.compact"], refs["cnn.recovered"], atol=1e-5, rtol=1e-5)
    assert any(d[:3] == (f"tester/{name}-pof", "main", "model.safetensors") for d in hub.downloads)


def test_hub_errors_name_the_repo(hub_round_trip):
    errors = hub_round_trip[1]["errors"]
    assert errors["missing_repo"].startswith("FileNotFoundError") and "'tester/nothing'" in errors["missing_repo"]
    assert "'nope'" in errors["missing_rev"]
    assert errors["unreachable"].startswith("HubUnreachableError") and "'tester/not-cached'" in errors["unreachable"]


def test_card_yaml_is_valid_for_the_hub(hub_round_trip):
    hub = hub_round_trip[0]
    assert ("POST", "/api/validate-yaml") in hub.requests  # huggingface_hub validated it before committing
    card = hub.commits("tester/cnn-pof")[0].files["README.md"].decode()
    assert yaml.safe_load(card.split("---")[1])["library_name"] == "timm"
