"""Name -> method class registry. A method registers itself with ``@register_method("name")``.

It sits at the bottom of the package (it imports nothing of timm_prune at run time), so that ``PruneConfig``
can look methods up without importing them: ``timm_prune.methods`` registers the built-in ones on import.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .methods.base import PruneMethod

_METHODS: dict[str, type[PruneMethod]] = {}


def register_method(name: str):
    def decorator(cls: type[PruneMethod]) -> type[PruneMethod]:
        if name in _METHODS and _METHODS[name] is not cls:
            raise ValueError(f"pruning method {name!r} is already registered by {_METHODS[name].__qualname__}")
        cls.name = name
        _METHODS[name] = cls
        return cls

    return decorator


def get_method(name: str) -> type[PruneMethod]:
    try:
        return _METHODS[name]
    except KeyError:
        raise ValueError(f"unknown pruning method {name!r}; registered methods: {list_methods()}") from None


def list_methods() -> list[str]:
    return sorted(_METHODS)
