"""Calibration capture (timm_prune.oneshot.capture): input columns, statistics, hooks, sequential order."""

from __future__ import annotations

import copy
import warnings

import pytest
import timm
import torch
import torch.nn as nn
from timm.layers.conv2d_same import Conv2dSame, Conv2dSameExport
from timm.layers.padding import pad_same_arg
from timm.layers.std_conv import StdConv2dSame

from timm_prune.oneshot import capture as capture_module
from timm_prune.oneshot.capture import (
    FeatureNorms,
    InputHessian,
    capture_all,
    capture_sequential,
    conv_columns,
    conv_padding,
    forward_order,
    input_columns,
    join_batches,
)
from timm_prune.oneshot.sparsegpt import sparsegpt_prune


def layer_output_from_columns(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The layer's output rebuilt as columns @ weight^T (bias aside), shaped ``(N, out, L)`` / ``(rows, out)``."""
    cols = input_columns(module, x)
    groups = cols.shape[0]
    weight = module.weight.detach().reshape(groups, module.weight.shape[0] // groups, -1)
    out = cols @ weight.transpose(1, 2)  # (groups, rows, out / groups)
    if isinstance(module, nn.Linear):
        return out[0]
    n = x.shape[0]
    return out.reshape(groups, n, -1, out.shape[-1]).permute(1, 0, 3, 2).reshape(n, module.weight.shape[0], -1)


def without_bias(module: nn.Module, out: torch.Tensor) -> torch.Tensor:
    """A layer's output minus its bias, shaped like ``layer_output_from_columns``."""
    if isinstance(module, nn.Conv2d):
        out = out if module.bias is None else out - module.bias.view(1, -1, 1, 1)
        return out.reshape(out.shape[0], out.shape[1], -1)
    out = out if module.bias is None else out - module.bias
    return out.reshape(-1, out.shape[-1])


CONVS = {
    "plain": lambda: nn.Conv2d(4, 6, 3, padding=1),
    "stride_dilation": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=2, dilation=2),
    "rect": lambda: nn.Conv2d(4, 6, (3, 2), stride=(2, 1), padding=(1, 0)),
    "groups": lambda: nn.Conv2d(4, 8, 3, padding=1, groups=2),
    "depthwise_x2": lambda: nn.Conv2d(4, 8, 3, padding=1, groups=4, bias=False),
    "reflect": lambda: nn.Conv2d(4, 6, 3, padding=(1, 2), padding_mode="reflect"),
    "replicate": lambda: nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="replicate", groups=2),
    "circular": lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, padding_mode="circular"),
    "same_even_kernel": lambda: nn.Conv2d(4, 6, 4, padding="same"),
    "same_dilated_reflect": lambda: nn.Conv2d(4, 6, 3, padding="same", dilation=2, padding_mode="reflect"),
    "valid": lambda: nn.Conv2d(4, 6, 3, padding="valid"),
    "timm_same_stride2": lambda: Conv2dSame(4, 6, 3, stride=2),
    "timm_same_even_kernel": lambda: Conv2dSame(4, 6, 4, stride=1, dilation=1),
    "timm_same_export": lambda: Conv2dSameExport(4, 6, 3, stride=2),
}


@pytest.mark.filterwarnings("ignore:Using padding='same' with even kernel lengths")
@pytest.mark.parametrize("size", [7, 8])
@pytest.mark.parametrize("kind", sorted(CONVS))
def test_conv_columns_reproduce_the_conv(kind, size):
    torch.manual_seed(0)
    conv = CONVS[kind]()
    x = torch.randn(2, 4, size, size + 1)
    with torch.no_grad():
        torch.testing.assert_close(layer_output_from_columns(conv, x), without_bias(conv, conv(x)))


def test_weight_standardised_same_conv_pads_like_timm():
    # StdConv2dSame pads dynamically too (its weight is transformed in forward, so only the padding is checked).
    conv = StdConv2dSame(4, 6, 3, stride=2, padding="same")
    assert conv.same_pad
    for hw in [(7, 8), (8, 8), (9, 5)]:
        expected = pad_same_arg(list(hw), [3, 3], [2, 2], [1, 1])
        assert list(conv_padding(conv, hw)) == expected


def test_conv_columns_equal_an_explicit_patch_loop():
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, dilation=2, padding=1, groups=2)
    x = torch.randn(2, 4, 9, 8)
    padded = torch.zeros(2, 4, 11, 10)
    padded[:, :, 1:-1, 1:-1] = x
    oh, ow = (11 - 4 - 1) // 2 + 1, (10 - 4 - 1) // 2 + 1
    reference = torch.zeros(2, 2 * oh * ow, 2 * 9)
    for g in range(2):
        for n in range(2):
            for i in range(oh):
                for j in range(ow):
                    entries = [
                        padded[n, 2 * g + c, 2 * i + 2 * a, 2 * j + 2 * b]
                        for c in range(2)
                        for a in range(3)
                        for b in range(3)
                    ]
                    reference[g, n * oh * ow + i * ow + j] = torch.stack(entries)
    torch.testing.assert_close(conv_columns(conv, x), reference)


def test_statistics_equal_the_column_reference_in_small_chunks(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(4, 6, 3, stride=2, padding=1, padding_mode="reflect", groups=2)
    linear = nn.Linear(5, 3)
    images, tokens = torch.randn(5, 4, 8, 8), torch.randn(3, 7, 5)
    cols, rows = conv_columns(conv, images).double(), tokens.reshape(1, -1, 5).double()
    monkeypatch.setattr(capture_module, "MAX_CHUNK_ELEMENTS", 400)  # several chunks per batch
    for module, x, ref in [(conv, images, cols), (linear, tokens, rows)]:
        norms, hessian = FeatureNorms(module, torch.float64), InputHessian(module, torch.float64)
        for half in (x[:2], x[2:]):
            norms.add(module, half)
            hessian.add(module, half)
        assert norms.rows == hessian.rows == ref.shape[1]
        torch.testing.assert_close(norms.squared_sum, ref.square().sum(1))
        torch.testing.assert_close(norms.norms(), ref.square().mean(1).sqrt())
        torch.testing.assert_close(hessian.hessian(), 2 * ref.transpose(1, 2) @ ref / ref.shape[1])


def _no_hooks(model: nn.Module) -> bool:
    return all(
        not (m._forward_pre_hooks or m._forward_hooks or m._forward_pre_hooks_with_kwargs) for m in model.modules()
    )


def _mlp() -> nn.Sequential:
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 3))


def test_no_hooks_left_behind_even_when_a_batch_or_the_callback_raises():
    model = _mlp().train()
    layers = {"0": model[0], "2": model[2]}
    good, bad = torch.randn(2, 4), torch.randn(2, 5)  # bad: wrong width, raises inside the first layer

    capture_all(model, layers, [good])
    assert _no_hooks(model) and all(m.training for m in model.modules())
    with pytest.raises(RuntimeError):
        capture_all(model, layers, [good, bad])
    assert _no_hooks(model) and all(m.training for m in model.modules())
    with pytest.raises(RuntimeError):
        forward_order(model, layers, bad)
    assert _no_hooks(model)

    def raising_forward(calls=[0]):  # noqa: B006 - a counter shared across calls
        def forward(m, batch):
            calls[0] += 1
            if calls[0] == 3:  # the discovery pass, layer 0's pass, then layer 2's pass raises
                raise RuntimeError("batch failed")
            return m(batch)

        return forward

    with pytest.raises(RuntimeError, match="batch failed"):
        capture_sequential(model, layers, [good], lambda *a: None, forward=raising_forward(), one_pass=False)
    assert _no_hooks(model) and all(m.training for m in model.modules())

    def failing_callback(name, module, stats):
        raise ValueError("prune failed")

    for one_pass in (True, False):  # one pass: the callback raises inside a forward pre-hook
        with pytest.raises(ValueError, match="prune failed"):
            capture_sequential(model, layers, [good], failing_callback, one_pass=one_pass)
        assert _no_hooks(model) and all(m.training for m in model.modules())


@pytest.mark.parametrize(
    "batches",
    [
        [torch.randn(3, 4), torch.randn(2, 4)],  # joined: one pass
        [(torch.randn(3, 4), torch.tensor([0, 1, 2])), (torch.randn(2, 4), torch.tensor([0, 1]))],  # joined pairs
        [torch.randn(3, 4), (torch.randn(2, 4), torch.tensor([0, 1]))],  # cannot be joined: a pass per layer
    ],
    ids=["tensors", "pairs", "mixed"],
)
def test_sequential_layers_see_the_already_pruned_layers_before_them(batches):
    model = _mlp()
    layers = {"0": model[0], "2": model[2]}
    seen = []

    def prune_everything(name, module, stats):
        seen.append((name, stats.rows, stats.squared_sum.clone()))
        with torch.no_grad():
            module.weight.zero_()
            module.bias.zero_()

    joinable = all(isinstance(b, type(batches[0])) for b in batches)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        run = capture_sequential(model, layers, batches, prune_everything, stats_factory=lambda n, m: FeatureNorms(m))
    assert any("cannot be joined" in str(w.message) for w in caught) != joinable
    assert run.passes == (1 if joinable else 2 * len(batches))
    assert run.order == ["0", "2"] and run.unreached == []
    assert [s[0] for s in seen] == ["0", "2"] and [s[1] for s in seen] == [5, 5]
    assert seen[0][2].sum() > 0
    assert seen[1][2].sum() == 0  # layer 0 was pruned to zero before layer 2's statistics were taken
    # The one-pass mode sees the model as it is (here: pruned), on a fresh copy it sees live inputs.
    fresh = _mlp()
    stats = capture_all(fresh, {"0": fresh[0], "2": fresh[2]}, batches)
    assert stats["2"].squared_sum.sum() > 0 and stats["0"].rows == 5


class _Counting(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.calls = 0

    def forward(self, x):
        self.calls += 1
        return x


class _OutOfOrder(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.late = nn.Linear(4, 4)
        self.early = nn.Linear(4, 4)
        self.shared = nn.Linear(4, 4)
        self.unused = nn.Linear(4, 4)
        self.tail = _Counting()

    def forward(self, x):
        return self.tail(self.shared(self.shared(self.late(self.early(x)))))


def test_forward_order_early_stop_shared_and_unreached_layers():
    torch.manual_seed(0)
    model = _OutOfOrder()
    layers = {n: getattr(model, n) for n in ("late", "early", "shared", "unused")}
    batches = [torch.randn(2, 4), torch.randn(3, 4)]
    order, calls = forward_order(model, layers, batches[0])
    assert order == ["early", "late", "shared"] and calls == {"late": 1, "early": 1, "shared": 2, "unused": 0}

    rows = {}
    model.tail.calls = 0
    with pytest.warns(UserWarning, match="never ran.*unused"):
        run = capture_sequential(model, layers, batches, lambda n, m, s: rows.setdefault(n, s.rows), one_pass=False)
    assert run.order == order and run.unreached == ["unused"]
    assert rows == {"early": 5, "late": 5, "shared": 10}  # a layer run twice per forward sees both inputs
    # Discovery pass + 'shared' passes run to the end; 'early' and 'late' passes stop at their layer.
    assert model.tail.calls == 1 + len(batches)
    assert run.passes == 3 * len(batches)
    assert _no_hooks(model)

    # One pass: 'early' and 'late' inside one forward over the joined batches; the shared layer, which needs
    # both of its calls' inputs, afterwards with a pass per batch (run to the end: it runs twice).
    rows.clear()
    model.tail.calls = 0
    with pytest.warns(UserWarning, match="never ran.*unused"):
        run = capture_sequential(model, layers, batches, lambda n, m, s: rows.setdefault(n, s.rows))
    assert run.order == ["early", "late", "shared"] and run.unreached == ["unused"]
    assert rows == {"early": 5, "late": 5, "shared": 10}
    assert run.passes == 1 + len(batches) and model.tail.calls == 1 + 1 + len(batches)
    assert _no_hooks(model)


def test_join_batches_structures_and_errors():
    a, b = torch.randn(2, 3), torch.randn(1, 3)
    joined = join_batches([(a, torch.tensor([0, 1])), (b, torch.tensor([2]))])
    assert isinstance(joined, tuple) and torch.equal(joined[0], torch.cat([a, b]))
    assert joined[1].tolist() == [0, 1, 2]
    joined = join_batches([{"pixel_values": a}, {"pixel_values": b}])
    assert torch.equal(joined["pixel_values"], torch.cat([a, b]))
    scalars = [(a, torch.tensor(1.0)), (b, torch.tensor(2.0))]  # a 0-d leaf has no batch dim to join along
    for bad in ([a, torch.randn(1, 4)], [a, (b,)], [{"x": a}, {"y": b}], [["text"], ["more"]], scalars):
        with pytest.raises(TypeError, match="cannot be joined"):
            join_batches(bad)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["test_resnet", "test_vit"])
def test_one_pass_prunes_exactly_like_a_pass_per_layer(name):
    """The one-forward sequential mode is the same algorithm: same masks, same updated weights."""
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    torch.manual_seed(0)
    reference = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    images = [torch.randn(3, 3, 32, 32), torch.randn(2, 3, 32, 32)]
    pruned = {}
    for one_pass in (True, False):
        model = copy.deepcopy(reference)
        layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
        keeps = {}

        def prune(layer_name, module, s, keeps=keeps):
            result = sparsegpt_prune(module.weight, s.hessian(), 0.6)
            keeps[layer_name] = result.keep
            with torch.no_grad():
                module.weight.copy_(result.weight)

        run = capture_sequential(model, layers, images, prune, one_pass=one_pass)
        assert run.passes == 1 if one_pass else run.passes > len(layers)
        pruned[one_pass] = (run.order, keeps, {n: m.weight.detach().clone() for n, m in layers.items()})
    (order_1, keeps_1, weights_1), (order_n, keeps_n, weights_n) = pruned[True], pruned[False]
    assert order_1 == order_n
    # Float sums in another order may flip a tie in a mask; all but a handful of entries must agree.
    agree = sum(int((keeps_1[n] == keeps_n[n]).sum()) for n in keeps_1)
    assert agree >= sum(k.numel() for k in keeps_1.values()) - 4
    for n in weights_1:
        # A flipped tie changes the error compensation of the rest of its row: compare the rows whose masks agree.
        same = (keeps_1[n] == keeps_n[n]).flatten(1).all(dim=1)
        torch.testing.assert_close(weights_1[n][same], weights_n[n][same], rtol=1e-3, atol=1e-3)
    ref_weights = dict(reference.named_parameters())
    assert any(not torch.equal(weights_1[n], ref_weights[n + ".weight"]) for n in weights_1)


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["test_resnet", "test_vit", "test_efficientnet", "test_convnext"])
def test_timm_models_columns_statistics_and_a_sequential_prune(name):
    torch.manual_seed(0)
    kwargs = {"img_size": 32} if name == "test_vit" else {}
    model = timm.create_model(name, pretrained=False, num_classes=10, **kwargs).eval()
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    images = [torch.randn(2, 3, 32, 32), torch.randn(2, 3, 32, 32)]

    # The columns rebuild every layer's real output inside the model (padding, stride, groups as they run).
    checked = []

    def check(module, args, output):
        expected = without_bias(module, output)
        torch.testing.assert_close(layer_output_from_columns(module, args[0]), expected, rtol=1e-4, atol=1e-4)
        checked.append(module)

    handles = [m.register_forward_hook(check) for m in layers.values()]
    try:
        with torch.no_grad():
            model(images[0])
    finally:
        for h in handles:
            h.remove()
    assert len(checked) >= len(layers)

    stats = capture_all(model, layers, images)
    assert set(stats) == set(layers)
    for n, s in stats.items():
        weight = layers[n].weight
        groups = layers[n].groups if isinstance(layers[n], nn.Conv2d) else 1
        assert s.norms().shape == (groups, weight[0].numel())
    assert _no_hooks(model)

    keeps = {}

    def prune(layer_name, module, s):
        result = sparsegpt_prune(module.weight, s.hessian(), 0.5)
        keeps[layer_name] = result.keep
        with torch.no_grad():
            module.weight.copy_(result.weight)

    run = capture_sequential(model, layers, images, prune)
    assert sorted(run.order) == sorted(layers) and not run.unreached
    for n, module in layers.items():
        keep = keeps[n].reshape(module.weight.shape[0], -1)
        assert (keep.sum(1) == keep.shape[1] - round(0.5 * keep.shape[1])).all()
        assert (module.weight[~keeps[n]] == 0).all()
    with torch.no_grad():
        assert torch.isfinite(model(images[0])).all()
    assert _no_hooks(model) and not model.training
