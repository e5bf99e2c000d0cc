"""Saved pruned models as files: write (``save``), read (``load``), publish (``push``), render the card (``card``).

This package handles plain data only (``SavedState``: a timm model, a ``PruneConfig``, dicts and tensors).
``PrunableModel.save_pretrained`` / ``push_to_hub`` and ``timm_prune.from_pretrained`` convert between that
state and the wrapper, so nothing here imports ``timm_prune.model`` (an import-linter contract holds it).
"""

from .files import FileFormatError, HubUnreachableError, SavedState
from .load import load_state, locate, read_pruning_info
from .push import check_push_access, push_folder, push_to_hub
from .save import save_pretrained

__all__ = [
    "FileFormatError",
    "HubUnreachableError",
    "SavedState",
    "check_push_access",
    "load_state",
    "locate",
    "push_folder",
    "push_to_hub",
    "read_pruning_info",
    "save_pretrained",
]
