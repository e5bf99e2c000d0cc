"""timm_prune: retrain-free pruning for timm models."""

from ._version import __version__
from .config import PruneConfig
from .hub import FileFormatError, HubUnreachableError, push_folder
from .methods import PruneMethod, list_methods, register_method
from .model import PrunableModel, convert, from_pretrained
from .reports import LayerReport, PruneReport, StructuredReport
from .structured import StructuredPruneError

__all__ = [
    "FileFormatError",
    "HubUnreachableError",
    "LayerReport",
    "PrunableModel",
    "PruneConfig",
    "PruneMethod",
    "PruneReport",
    "StructuredPruneError",
    "StructuredReport",
    "__version__",
    "convert",
    "from_pretrained",
    "list_methods",
    "push_folder",
    "register_method",
]
