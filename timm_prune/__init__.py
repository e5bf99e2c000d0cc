"""timm_prune: retrain-free pruning for timm models."""

from .config import PruneConfig
from .hub import FileFormatError, HubUnreachableError, from_pretrained, push_folder
from .masking import LayerReport, PruneReport
from .methods import PruneMethod, list_methods, register_method
from .model import PrunableModel, convert
from .structured import StructuredReport
from .structured_guard import StructuredPruneError

__version__ = "0.1.0"

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
