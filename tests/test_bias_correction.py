"""prune(bias_correction_batches=...): each pruned layer with a bias gets back its dense mean output per unit."""

from __future__ import annotations

import warnings

import pytest
import timm
import torch
import torch.nn as nn

import timm_prune
from timm_prune.reports import PruneReport


def _pm(name: str = "test_convnext", method: str = "magnitude", sparsity: float = 0.7) -> timm_prune.PrunableModel:
    torch.manual_seed(0)
    model = timm.create_model(name, num_classes=5)
    return timm_prune.convert(model, timm_prune.PruneConfig(method=method, sparsity=sparsity, scope="global")).eval()


def _batches(count: int = 3, size: int = 8) -> list[torch.Tensor]:
    generator = torch.Generator().manual_seed(1)
    # Inputs with a per-channel offset: their mean is far from zero, so pruning shifts the layers' outputs.
    return [torch.randn(size, 3, 32, 32, generator=generator) + 0.5 for _ in range(count)]


@torch.no_grad()
def _unit_means(pm: timm_prune.PrunableModel, batches: list[torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per-unit mean output of every targeted layer over the batches, measured here with plain hooks."""
    sums: dict[str, list] = {}

    def hook(name):
        def record(module, args, output):
            dims = [d for d in range(output.dim()) if d != (1 if isinstance(module, nn.Conv2d) else output.dim() - 1)]
            total = sums.setdefault(name, [0.0, 0])
            total[0] = total[0] + output.double().mean(dims)
            total[1] += 1

        return record

    handles = [module.register_forward_hook(hook(name)) for name, module in pm.targets.items()]
    for x in batches:
        pm(x)
    for handle in handles:
        handle.remove()
    return {name: total / count for name, (total, count) in sums.items()}


def test_every_corrected_layer_gets_its_dense_mean_output_back():
    batches = _batches()
    pm = _pm()
    dense = _unit_means(pm, batches)
    report = pm.prune(bias_correction_batches=batches, guard_bias_correction=False)
    with_bias = [name for name, module in pm.targets.items() if module.bias is not None]
    assert report.bias_corrected == sorted(with_bias) and len(with_bias) > 5
    corrected = _unit_means(pm, batches)

    uncorrected_pm = _pm()
    uncorrected_pm.prune()
    uncorrected = _unit_means(uncorrected_pm, batches)
    shifts = []
    for name in with_bias:
        scale = dense[name].abs().max() + 1e-6
        torch.testing.assert_close(corrected[name], dense[name], atol=1e-4 * float(scale), rtol=1e-4)
        shifts.append(float((uncorrected[name] - dense[name]).abs().max() / scale))
    # Without the correction the same pruning does shift the means: the check above is not vacuous.
    assert max(shifts) > 0.05
    assert torch.equal(pm.masks[with_bias[0]], uncorrected_pm.masks[with_bias[0]])


def test_the_correction_holds_under_autocast():
    # Autocast caches its bf16 copy of each bias for the whole region: a correction that did not drop the cache
    # would measure and run the old biases.
    batches = _batches(count=2)
    corrected, uncorrected, reference = _pm(), _pm(), _pm()
    reference.prune(bias_correction_batches=batches, guard_bias_correction=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        corrected(batches[0])  # a forward before pruning fills the cache
        corrected.prune(bias_correction_batches=batches, guard_bias_correction=False)
        uncorrected.prune()
        out, plain = corrected(batches[0]).float(), uncorrected(batches[0]).float()
    expected = reference(batches[0])
    assert (out - expected).abs().mean() < 0.25 * (plain - expected).abs().mean()


def test_layers_without_a_bias_are_left_alone():
    batches = _batches()
    pm, plain = _pm("test_resnet"), _pm("test_resnet")
    report = pm.prune(bias_correction_batches=batches, num_batches=2)
    plain.prune()
    assert report.bias_corrected == []
    assert "bias corrected" not in str(report)
    torch.testing.assert_close(pm(batches[0]), plain(batches[0]))


def test_only_the_first_num_batches_are_used():
    batches = _batches(count=3)
    pm, first_two = _pm(), _pm()
    pm.prune(bias_correction_batches=iter(batches), num_batches=2, guard_bias_correction=False)
    first_two.prune(bias_correction_batches=batches[:2], guard_bias_correction=False)
    torch.testing.assert_close(pm(batches[2]), first_two(batches[2]))


def test_data_free_recovery_on_top_is_refused_and_the_record_survives_saving(tmp_path):
    pm = _pm()
    batches = _batches(count=2)
    labelled = [(x, torch.zeros(len(x), dtype=torch.long)) for x in batches]
    pm.prune(bias_correction_batches=labelled, guard_bias_correction=False)
    with pytest.raises(ValueError, match="count them twice"):
        pm.recover("mean")
    pm.recover("none")  # undoing nothing is fine
    assert "bias corrected in" in str(pm.last_report)
    pm.save_pretrained(tmp_path / "corrected", pretrained=False)
    loaded = timm_prune.from_pretrained(str(tmp_path / "corrected")).eval()
    assert loaded.last_report.bias_corrected == pm.last_report.bias_corrected
    card = (tmp_path / "corrected" / "README.md").read_text()
    assert f"Bias-corrected after pruning in {len(pm.last_report.bias_corrected)} layers" in card
    torch.testing.assert_close(loaded(batches[0]), pm(batches[0]))
    with pytest.raises(ValueError, match="count them twice"):
        loaded.recover("mean")
    # Reports written before the field existed still load.
    old = pm.last_report.to_dict()
    del old["bias_corrected"]
    assert PruneReport.from_dict(old).bias_corrected == []


@pytest.mark.parametrize(
    ("batches", "num_batches", "match"),
    [([], 10, "yielded nothing"), (_batches(count=1), 0, "num_batches")],
)
def test_bad_calibration_input_fails_before_anything_is_pruned(batches, num_batches, match):
    pm = _pm()
    before = {name: module.weight.clone() for name, module in pm.targets.items()}
    with pytest.raises(ValueError, match=match):
        pm.prune(bias_correction_batches=batches, num_batches=num_batches)
    assert not pm.is_pruned
    assert all(torch.equal(module.weight, before[name]) for name, module in pm.targets.items())


def _agreement(model: nn.Module, batches: list[torch.Tensor], dense_predictions: list[torch.Tensor]) -> float:
    with torch.no_grad():
        pairs = zip(batches, dense_predictions, strict=True)
        hits = [(model(x).argmax(1) == expected).float() for x, expected in pairs]
    return float(torch.cat(hits).mean())


# Untrained test_convnext on offset noise: at 70 % the correction makes it agree less with the dense model, at 90 %
# more (found by trying; the test checks each decision against agreements it measures itself).
@pytest.mark.parametrize(("sparsity", "kept"), [(0.7, False), (0.9, True)])
def test_the_guard_keeps_the_correction_only_if_agreement_with_the_dense_model_does_not_drop(sparsity, kept):
    batches = _batches()
    dense = _pm(sparsity=sparsity)
    with torch.no_grad():
        dense_predictions = [dense(x).argmax(1) for x in batches]
    uncorrected, unguarded, guarded = _pm(sparsity=sparsity), _pm(sparsity=sparsity), _pm(sparsity=sparsity)
    uncorrected.prune()
    unguarded.prune(bias_correction_batches=batches, guard_bias_correction=False)
    before = _agreement(uncorrected, batches, dense_predictions)
    after = _agreement(unguarded, batches, dense_predictions)
    assert (after >= before) is kept

    if kept:
        report = guarded.prune(bias_correction_batches=batches)
        assert report.bias_corrected == unguarded.last_report.bias_corrected != []
        expected = unguarded
    else:
        with pytest.warns(UserWarning, match=rf"from {100 * before:.1f}% to {100 * after:.1f}%.*put back"):
            report = guarded.prune(bias_correction_batches=batches)
        assert report.bias_corrected == []
        assert "bias corrected" not in str(report)
        guarded.recover("mean")  # nothing was corrected, so the data-free recoveries are allowed again
        guarded.recover("none")
        expected = uncorrected
    for name, module in guarded.targets.items():
        if module.bias is not None:
            assert torch.equal(module.bias, expected.targets[name].bias), name
    torch.testing.assert_close(guarded(batches[0]), expected(batches[0]))


@pytest.mark.parametrize(("num_classes", "consulted"), [(0, False), (5, True)])
def test_the_guard_stands_aside_when_the_outputs_are_not_class_scores(monkeypatch, num_classes, consulted):
    # num_classes=0: the model returns pooled features, whose argmax means nothing. An agreement check that
    # reports a drop must not be consulted there (with class scores it is, and the correction is undone).
    import timm_prune.model

    calls = []
    monkeypatch.setattr(timm_prune.model, "top1_agreement", lambda *args: calls.append(1) or 1.0 / len(calls))
    torch.manual_seed(0)
    model = timm.create_model("test_convnext", num_classes=num_classes)
    pm = timm_prune.convert(model, timm_prune.PruneConfig(method="magnitude", sparsity=0.7, scope="global")).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = pm.prune(bias_correction_batches=_batches())
    assert bool(calls) is consulted
    assert (len(report.bias_corrected) > 5) is not consulted
