"""``prune()`` says so when it is about to remove a large share of the weights' energy (issue 16, item 9), and
POF's library default re-selects candidates every 10 steps, the setting README's step cost holds for (item 8)."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch

import timm_prune
from timm_prune.methods.pof import PofOptions


def _tiny(method: str, **kwargs) -> timm_prune.PrunableModel:
    torch.manual_seed(0)
    model = timm.create_model("test_resnet", num_classes=4)
    return timm_prune.convert(model, timm_prune.PruneConfig(method=method, sparsity=0.7, **kwargs))


def test_pruning_an_unpolarised_model_warns_with_the_share_and_the_remedy():
    pm = _tiny("pof")  # untrained: 70 % of the entries of random weights hold about a fifth of their energy
    with pytest.warns(UserWarning, match=r"removes \d+\.\d% of the targeted weights' energy") as record:
        pm.prune()
    message = str(record[0].message)
    assert "Train longer" in message and "penalty_weight (300)" in message and "warm-up" in message


def test_a_polarised_model_prunes_quietly():
    pm = _tiny("pof", threshold_refresh=1)
    with torch.no_grad():  # what a converged penalty leaves: the candidates drained to (almost) nothing
        for _ in range(2):
            keep = pm.pruner.keep_masks()
            for name, module in pm.targets.items():
                module.weight = module.weight * (keep[name] + 1e-3 * ~keep[name])
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.prune()


def test_methods_without_a_penalty_do_not_warn():
    pm = _tiny("magnitude")  # plain training then magnitude pruning: no penalty to blame or tune
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pm.prune()


def test_pof_refreshes_its_candidates_every_10_steps_by_default():
    assert PofOptions().threshold_refresh == 10
    assert timm_prune.PruneConfig(method="pof").threshold_refresh == 10
