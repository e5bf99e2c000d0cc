"""One-shot pruning from calibration data, no training: Wanda, SparseGPT and N:M patterns (numerical core).

- ``capture``: layer-input statistics from calibration batches (all layers in one pass, or SparseGPT's
  sequential mode, one layer at a time in forward order).
- ``wanda``: ``|W| * ||X_j||`` scores and per-output-row masks (Sun et al. 2023, arXiv 2306.11695).
- ``sparsegpt``: the OBS prune-and-update solve per layer (Frantar & Alistarh 2023, arXiv 2301.00774).
- ``nm``: N:M keep masks along the input-channel dimension and the ``"N:M"`` pattern parser.
"""

from .capture import (
    FeatureNorms,
    InputHessian,
    InputStatistics,
    SequentialRun,
    capture_all,
    capture_sequential,
    conv_columns,
    forward_order,
    input_columns,
)
from .nm import NMPattern, is_nm, nm_compatible, nm_keep_mask, parse_pattern
from .sparsegpt import SparseGPTResult, obs_scores, sparsegpt_prune
from .wanda import row_keep_mask, wanda_keep_mask, wanda_scores

__all__ = [
    "FeatureNorms",
    "InputHessian",
    "InputStatistics",
    "NMPattern",
    "SequentialRun",
    "SparseGPTResult",
    "capture_all",
    "capture_sequential",
    "conv_columns",
    "forward_order",
    "input_columns",
    "is_nm",
    "nm_compatible",
    "nm_keep_mask",
    "obs_scores",
    "parse_pattern",
    "row_keep_mask",
    "sparsegpt_prune",
    "wanda_keep_mask",
    "wanda_scores",
]
