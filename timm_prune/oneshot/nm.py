"""N:M semi-structured keep masks: exactly N weights kept in every group of M consecutive inputs.

Grouping (one rule for every layer): groups run along **dim 1 of the weight**, the input-channel dimension,
M consecutive input channels at a time, every other index fixed.

- Linear ``(out, in)``: each output row is cut into ``in / M`` groups of M consecutive inputs. This is the
  layout ``torch.sparse.to_sparse_semi_structured`` (2:4, cuSPARSELt / CUTLASS) expects of a Linear weight.
- Conv2d ``(out, in/groups, kh, kw)``: for every output channel and every kernel position ``(kh, kw)``, the
  ``in/groups`` input channels are cut into groups of M. This is the K dimension of an NHWC implicit GEMM,
  ordered ``(kh, kw, c)``, which is what sparse-tensor-core convolutions (TensorRT, NVIDIA's ASP) require; a
  1x1 conv is then exactly a Linear. Grouping along the flattened ``(c, kh, kw)`` order instead would mix
  kernel positions inside a group and match no kernel.

A layer whose input-channel count (per conv group) is not a multiple of M cannot hold a valid N:M pattern:
no partial tail group is invented (``to_sparse_semi_structured`` rejects such a matrix too). Those layers
raise ``ValueError``; ``nm_compatible`` tells a caller in advance, so that a method can leave such layers
(depthwise convs, odd widths) dense and say so in its report.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import NM_ALLOWED as _ALLOWED
from ..config import nm_pattern


@dataclass(frozen=True)
class NMPattern:
    """Keep ``n`` of every ``m`` consecutive inputs (see the module docstring for the grouping)."""

    n: int
    m: int

    @property
    def sparsity(self) -> float:
        return 1.0 - self.n / self.m

    def __str__(self) -> str:
        return f"{self.n}:{self.m}"


def parse_pattern(pattern: str | tuple[int, int] | NMPattern | None) -> NMPattern | None:
    """Parse and validate ``pattern`` (``"2:4"``, ``(2, 4)``, an ``NMPattern`` or ``None``).

    The syntax is ``PruneConfig.pattern``'s (``timm_prune.config.nm_pattern``, its one parser).

    Raises:
        ValueError: naming the field ``pattern`` and the allowed form, for anything else.
    """
    if isinstance(pattern, NMPattern):
        nm_pattern((pattern.n, pattern.m))
        return pattern
    parsed = nm_pattern(pattern)
    return None if parsed is None else NMPattern(*parsed)


def nm_compatible(weight_shape: tuple[int, ...] | torch.Size, pattern: str | tuple[int, int] | NMPattern) -> bool:
    """True when a weight of this shape (Linear or Conv2d) can hold ``pattern`` (dim 1 divisible by M)."""
    parsed = parse_pattern(pattern)
    assert parsed is not None
    return len(weight_shape) >= 2 and weight_shape[1] % parsed.m == 0


def _channels_last(t: torch.Tensor) -> torch.Tensor:
    """Move dim 1 (input channels) last: ``(out, c, *k) -> (out, *k, c)``."""
    return t.movedim(1, -1) if t.dim() > 2 else t


def _channels_back(t: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return t.movedim(-1, 1) if like.dim() > 2 else t


def nm_keep_mask_lastdim(scores: torch.Tensor, n: int, m: int) -> torch.Tensor:
    """Keep-mask over groups of ``m`` consecutive entries of the LAST dim: the ``n`` highest scores kept.

    The last dim must be a multiple of ``m``. Ties: of equal scores, the earlier ones are pruned first.
    """
    size = scores.shape[-1]
    if size % m:
        raise ValueError(f"N:M grouping needs the grouped dimension ({size}) to be a multiple of M={m}")
    grouped = scores.detach().reshape(*scores.shape[:-1], size // m, m)
    # Stable ascending sort: the first (m - n) positions of each group are its lowest scores.
    order = torch.sort(grouped.to(torch.float32), dim=-1, stable=True).indices
    keep = torch.ones(grouped.shape, dtype=torch.bool, device=scores.device)
    keep.scatter_(-1, order[..., : m - n], False)
    return keep.reshape(scores.shape)


def nm_keep_mask(scores: torch.Tensor, pattern: str | tuple[int, int] | NMPattern) -> torch.Tensor:
    """N:M keep-mask for a weight-shaped score tensor (Linear ``(out, in)`` or Conv2d ``(out, in/g, kh, kw)``).

    Exactly N entries are kept in every group of M (module docstring: groups of M input channels, each kernel
    position on its own); the lowest scores of each group are pruned.

    Raises:
        ValueError: on a bad ``pattern``, or when dim 1 of ``scores`` is not a multiple of M.
    """
    parsed = parse_pattern(pattern)
    if parsed is None:
        raise ValueError(f"pattern=None is invalid here; expected {_ALLOWED}")
    if scores.dim() < 2:
        raise ValueError(f"N:M masks need a Linear or Conv2d weight shape; got {tuple(scores.shape)}")
    if scores.shape[1] % parsed.m:
        raise ValueError(
            f"pattern='{parsed}' cannot apply to a weight of shape {tuple(scores.shape)}: its input-channel "
            f"dimension ({scores.shape[1]}, dim 1) is not a multiple of M={parsed.m}; leave this layer out "
            "(exclude_modules) or choose an M that divides it"
        )
    keep = nm_keep_mask_lastdim(_channels_last(scores), parsed.n, parsed.m)
    return _channels_back(keep, scores).contiguous()


def is_nm(keep: torch.Tensor, pattern: str | tuple[int, int] | NMPattern) -> bool:
    """True when ``keep`` holds exactly N non-zeros in every group of M (same grouping as ``nm_keep_mask``)."""
    parsed = parse_pattern(pattern)
    assert parsed is not None
    if keep.dim() < 2 or keep.shape[1] % parsed.m:
        return False
    last = _channels_last(keep != 0)
    counts = last.reshape(*last.shape[:-1], last.shape[-1] // parsed.m, parsed.m).sum(-1)
    return bool((counts == parsed.n).all())


__all__ = ["NMPattern", "is_nm", "nm_compatible", "nm_keep_mask", "nm_keep_mask_lastdim", "parse_pattern"]
