"""Pruning methods, one module each, registered by name (``timm_prune.registry``); ``base.py`` is the contract."""

from ..registry import get_method, list_methods, register_method
from . import (
    autobot,  # noqa: F401  (registers "autobot")
    gmp,  # noqa: F401  (registers "gmp")
    magnitude,  # noqa: F401  (registers "magnitude")
    pof,  # noqa: F401  (registers "pof")
    psap,  # noqa: F401  (registers "psap")
    slr,  # noqa: F401  (registers "slr")
    sparsegpt,  # noqa: F401  (registers "sparsegpt")
    wanda,  # noqa: F401  (registers "wanda")
)
from .base import PruneMethod

__all__ = ["PruneMethod", "get_method", "list_methods", "register_method"]
