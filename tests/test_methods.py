"""One table over every registered method (``timm_prune.list_methods()``): the contract of ``methods/base.py``.

For each method: convert a tiny model, train two steps, calibrate if the method needs it, prune, save,
``from_pretrained``, identical outputs, config JSON round trip, and bad options raising ``ValueError`` that
names the field. A new method gets all of it by registering; ``FAST`` only shortens what it would run.
"""

from __future__ import annotations

import dataclasses
import json

import pytest
import timm
import torch
import torch.nn.functional as F

import timm_prune
from timm_prune.methods import get_method

# Options that keep each method's run short on a tiny model (defaults are sized for real training).
FAST = {
    "autobot": {"flops_target": 0.6, "latency_runs": 0},
    "psap": {"sparsity": 0.3, "prune_every": 1, "prune_steps": 1, "score_steps": 1, "latency_runs": 0},
}


# Tiny tensors on 2 shared cores: one intra-op thread is much faster (conftest.one_thread).
pytestmark = pytest.mark.usefixtures("one_thread")


def _data(n: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return torch.randn(n, 3, 32, 32, generator=generator), torch.randint(0, 4, (n,), generator=generator)


def _convert(name: str, **options) -> timm_prune.PrunableModel:
    model = timm.create_model("test_resnet", num_classes=4)
    return timm_prune.convert(model, timm_prune.PruneConfig(method=name, **{**FAST.get(name, {}), **options}))


@pytest.mark.parametrize("name", timm_prune.list_methods())
def test_method_trains_prunes_saves_and_loads(name: str, tmp_path) -> None:
    pm = _convert(name)
    x, y = _data()
    optimizer = torch.optim.SGD([p for p in pm.parameters() if p.requires_grad], lr=0.01)
    pm.train()
    losses = []
    for step in range(2):
        loss = F.cross_entropy(pm(x), y) + pm.penalty()
        assert loss.dim() == 0 and torch.isfinite(loss)
        loss.backward()
        optimizer.step()
        assert isinstance(pm.on_step_end(step=step + 1, total_steps=2), dict)
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    assert isinstance(pm.on_epoch_end(train_loss=sum(losses) / 2), dict)
    assert isinstance(pm.candidate_energy(), dict)
    if pm.pruner.needs_calibration:
        assert isinstance(pm.calibrate([(x, y)] * 2), dict)
    pm.eval()
    report = pm.prune()
    assert pm.is_pruned and report is pm.last_report
    if pm.pruner.structured:
        assert isinstance(report, timm_prune.StructuredReport) and pm.pruner.structure() is not None
        with pytest.raises(ValueError, match="nothing to recover"):
            pm.recover("mean")
    else:
        assert isinstance(report, timm_prune.PruneReport) and pm.pruner.structure() is None
        assert report.sparsity == pytest.approx(pm.config.sparsity, abs=0.02)
        pm.recover()
    json.dumps(report.to_dict())
    with torch.no_grad():
        expected = pm(x)
    path = pm.save_pretrained(tmp_path / name)
    loaded = timm_prune.from_pretrained(path)
    assert type(loaded.pruner) is type(pm.pruner) and loaded.config == pm.config
    assert type(loaded.last_report) is type(report) and loaded.recovery == pm.recovery
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), expected, rtol=1e-5, atol=1e-5)
    # The saved config names only the fields the method uses.
    with open(path + "/pruning_config.json") as f:
        saved = json.load(f)["config"]
    assert saved == pm.config.to_dict()
    assert not set(saved) & set(get_method(name).unused_fields)


@pytest.mark.parametrize("name", timm_prune.list_methods())
def test_method_config_round_trips_through_json(name: str) -> None:
    config = timm_prune.PruneConfig(method=name, **FAST.get(name, {}))
    assert timm_prune.PruneConfig.from_json(config.to_json()) == config
    assert timm_prune.PruneConfig.from_dict(json.loads(json.dumps(config.to_dict()))) == config
    for field in get_method(name).unused_fields:
        assert getattr(config, field) is None


def _numeric_fields(name: str) -> list[str]:
    fields = dataclasses.fields(get_method(name).options_cls)
    return [f.name for f in fields if type(f.default) in (int, float)]


@pytest.mark.parametrize(
    ("name", "field"),
    [(name, field) for name in timm_prune.list_methods() for field in _numeric_fields(name) + ["sparsity"]],
)
def test_method_rejects_a_bad_option_naming_it(name: str, field: str) -> None:
    with pytest.raises(ValueError, match=rf"PruneConfig\.{field}\b"):
        timm_prune.PruneConfig(method=name, **{**FAST.get(name, {}), field: "not a number"})


@pytest.mark.parametrize("name", timm_prune.list_methods())
def test_method_rejects_an_unknown_option(name: str) -> None:
    with pytest.raises(ValueError, match="no_such_field"):
        timm_prune.PruneConfig(method=name, no_such_field=1)
