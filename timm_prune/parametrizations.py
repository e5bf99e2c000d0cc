"""Weight parametrizations and forward hooks shared by every method: masks and data-free recovery.

``MaskedWeight`` sits last in a layer's ``torch.nn.utils.parametrize`` chain, so the module keeps its own
class and forward while the weight it reads is ``w * keep`` (or, once recovered, ``(scale * w - mean) * keep``).
The recovery hook adds ``mean * (sum of the inputs over the receptive field)``, which together with the
shifted kept weights equals the dense layer whose pruned entries hold ``mean``, without un-zeroing any weight.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from timm.layers.conv2d_same import Conv2dSame, conv2d_same
from torch.nn.utils import parametrize


def _unit_shape(weight: torch.Tensor) -> tuple[int, ...]:
    return (weight.shape[0],) + (1,) * (weight.dim() - 1)


class MaskedWeight(nn.Module):
    """``w -> (scale * w - mean) * keep`` per output unit; ``scale``/``mean`` are 1/0 until recovery."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        # Non-persistent: the mask is the zero pattern of the saved weights, so it never needs its own file.
        self.register_buffer("keep", keep.detach().clone(), persistent=False)
        self.register_buffer("mean", None, persistent=False)
        self.register_buffer("scale", None, persistent=False)

    def forward(self, weight: torch.Tensor) -> torch.Tensor:
        keep = self.keep.to(weight.dtype)
        if self.scale is not None:
            weight = weight * self.scale.to(weight.dtype).view(_unit_shape(weight))
        if self.mean is not None:
            weight = weight - self.mean.to(weight.dtype).view(_unit_shape(weight))
        return weight * keep

    def right_inverse(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def set_recovery(self, mean: torch.Tensor | None, scale: torch.Tensor | None) -> None:
        self.mean = None if mean is None else mean.detach().clone()
        self.scale = None if scale is None else scale.detach().clone()


def masked_weight(module: nn.Module) -> MaskedWeight | None:
    if not parametrize.is_parametrized(module, "weight"):
        return None
    for p in module.parametrizations.weight:
        if isinstance(p, MaskedWeight):
            return p
    return None


def unmasked_weight(module: nn.Module) -> torch.Tensor:
    """The layer's weight as its parametrizations compute it, minus the mask (and recovery) step."""
    if not parametrize.is_parametrized(module, "weight"):
        return module.weight
    plist = module.parametrizations.weight
    if plist.is_tensor:
        originals = [plist.original]
    else:
        originals = [getattr(plist, f"original{i}") for i in range(plist.ntensors)]
    steps = [p for p in plist if not isinstance(p, MaskedWeight)]
    if not steps:
        return originals[0]
    value = steps[0](*originals)
    for step in steps[1:]:
        value = step(value)
    return value


def _conv_path(module: nn.Conv2d, x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Convolve ``x`` with ``weight`` exactly as ``module`` would: same padding mode, stride, dilation, groups."""
    if type(module).forward is Conv2dSame.forward:
        return conv2d_same(x, weight, None, module.stride, module.padding, module.dilation, module.groups)
    return nn.Conv2d._conv_forward(module, x, weight, None)


def receptive_field_sum(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """Sum of the inputs each output unit sees, shaped like the layer's output.

    A row sum for Linear; for Conv2d a box filter per group (one channel per group, expanded to the
    group's output channels) using the layer's own padding, stride and dilation.
    """
    if isinstance(module, nn.Linear):
        return x.sum(-1, keepdim=True)
    groups = module.groups
    in_per_group = module.in_channels // groups
    box = torch.ones((groups, in_per_group, *module.kernel_size), dtype=x.dtype, device=x.device)
    summed = _conv_path(module, x, box)
    return summed.repeat_interleave(module.out_channels // groups, dim=1)


def recovery_hook(module: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
    mask = masked_weight(module)
    if mask is None or mask.mean is None:
        return output
    x = args[0]
    mean = mask.mean.to(output.dtype)
    if isinstance(module, nn.Linear):
        return output + receptive_field_sum(module, x).to(output.dtype) * mean
    return output + receptive_field_sum(module, x).to(output.dtype) * mean.view(1, -1, 1, 1)


def fold_weight(module: nn.Module, recovered: bool) -> torch.Tensor:
    """The plain weight a standard layer needs to reproduce ``module``.

    ``recovered=False``: the pruned weight (exact zeros). ``recovered=True``: dense, the pruned entries
    holding the recovery mean and the kept ones their recovery scale.
    """
    with torch.no_grad():
        weight = unmasked_weight(module).detach()
        mask = masked_weight(module)
        if mask is None:
            return weight.clone()
        keep = mask.keep.to(weight.dtype)
        if not recovered:
            return weight * keep
        shape = _unit_shape(weight)
        kept = weight * (mask.scale.to(weight.dtype).view(shape) if mask.scale is not None else 1.0)
        mean = mask.mean.to(weight.dtype).view(shape) if mask.mean is not None else 0.0
        return kept * keep + mean * (1 - keep)


def unparametrize_copy(module: nn.Module, weight: torch.Tensor) -> None:
    """Turn a deep-copied parametrized layer back into its plain class with ``weight`` as a Parameter.

    ``remove_parametrizations`` must not be used on a deep copy: the copy shares its generated class with
    the original, so removing the property there removes it from the original too.
    """
    if not parametrize.is_parametrized(module):
        module.weight = nn.Parameter(weight, requires_grad=module.weight.requires_grad)
        return
    requires_grad = any(p.requires_grad for p in module.parametrizations.weight.parameters())
    del module._modules["parametrizations"]
    module.__class__ = type(module).__bases__[0]
    module.register_parameter("weight", nn.Parameter(weight, requires_grad=requires_grad))


__all__ = [
    "MaskedWeight",
    "fold_weight",
    "masked_weight",
    "receptive_field_sum",
    "recovery_hook",
    "unmasked_weight",
    "unparametrize_copy",
]
