"""The files of a saved pruned model: their names, the errors that name them, and readers that refuse pickles.

Everything here reads safetensors and JSON only. Nothing in this package ever calls ``torch.load`` or
``pickle``: a checkpoint in a pickle format is refused, because unpickling runs arbitrary code.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import SafetensorError, safe_open

from ..config import RECOVERY_KINDS, PruneConfig  # noqa: F401  (RECOVERY_KINDS re-exported for the loaders)

CONFIG_NAME = "config.json"
DENSE_WEIGHTS_NAME = "model.safetensors"
COMPACT_WEIGHTS_NAME = "model_compact.safetensors"
PRUNING_CONFIG_NAME = "pruning_config.json"
RECOVERY_NAME = "mean_recovery.safetensors"
CARD_NAME = "README.md"
PLOT_NAME = "pruning_plot.png"
# Every file save_pretrained may write: a new save removes the ones it does not rewrite (a dense save must
# not leave a stale compact file behind, and vice versa).
OWN_FILES = (
    CONFIG_NAME,
    DENSE_WEIGHTS_NAME,
    COMPACT_WEIGHTS_NAME,
    PRUNING_CONFIG_NAME,
    RECOVERY_NAME,
    CARD_NAME,
    PLOT_NAME,
)
SAVE_FORMATS = {"dense": DENSE_WEIGHTS_NAME, "compact": COMPACT_WEIGHTS_NAME}
SCHEMA_VERSION = 1
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pth.tar", ".pkl", ".pickle", ".ckpt")


@dataclass
class SavedState:
    """What a saved pruned model holds, as plain data: what ``save_pretrained`` writes and the loader returns.

    ``PrunableModel`` builds one to save and is rebuilt from one on load; this package never sees the wrapper.
    """

    # A plain timm model: merged weights (pruned entries 0) for unstructured methods, the narrowed model for
    # structured ones (weights loaded, on load).
    model: torch.nn.Module
    config: PruneConfig
    report: dict[str, Any] | None = None  # the report's to_dict(); None: never pruned
    # The recovery active when saved; on load, the one to apply (resolved from ``recover=``).
    recovery: str = "none"
    masks: dict[str, torch.Tensor] = field(default_factory=dict)  # layer name -> keep-mask (pruned layers)
    # layer name -> recovery kind -> (mean, scale) per output unit
    recovery_stats: dict[str, dict[str, tuple[torch.Tensor, torch.Tensor]]] = field(default_factory=dict)
    metrics: dict[str, Any] = field(default_factory=dict)
    structure: dict[str, Any] | None = None  # structured methods: the record that rebuilds the narrowed model
    base_model: str | None = None  # Hub id the model was pruned from


class FileFormatError(ValueError):
    """A saved file is missing, unreadable or inconsistent; the message names the file and the problem."""

    def __init__(self, filename: str, problem: str) -> None:
        super().__init__(f"{filename}: {problem}")
        self.filename = filename
        self.problem = problem


class HubUnreachableError(OSError):
    """The Hub could not be reached (or the repo read) for ``repo_id``."""

    def __init__(self, repo_id: str, detail: str, action: str = "load") -> None:
        where = "from" if action == "load" else "to"
        super().__init__(f"could not {action} {repo_id!r} {where} the Hugging Face Hub: {detail}")
        self.repo_id = repo_id
        self.action = action


def is_pickle_name(name: str) -> bool:
    return name.lower().endswith(PICKLE_SUFFIXES)


def looks_like_pickle(path: str) -> bool:
    """Whether a file starts as ``torch.save`` output does (a zip archive) or as a pickle (protocol >= 2)."""
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head.startswith(b"PK\x03\x04") or head[:1] == b"\x80"


def refuse_pickles(names: Iterable[str], where: str, directory: str | None = None) -> None:
    """Raise when the only checkpoints on offer are pickles (called once the safetensors file is missing).

    ``directory``: where the names are, on disk; a ``.bin`` file there counts only when its bytes look like a
    pickle (``.bin`` is also any other binary: a random one is not a "pickle checkpoint")."""
    pickles = sorted(
        n
        for n in names
        if is_pickle_name(n)
        and (directory is None or not n.lower().endswith(".bin") or looks_like_pickle(os.path.join(directory, n)))
    )
    if pickles:
        raise FileFormatError(
            ", ".join(pickles),
            f"{where} has only pickle checkpoint(s); timm_prune loads safetensors and JSON only and never "
            "unpickles (unpickling runs arbitrary code). Convert the weights to model.safetensors with a tool you "
            "trust, or save the model again with PrunableModel.save_pretrained.",
        )


def read_json(path: str) -> dict[str, Any]:
    name = os.path.basename(path)
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except FileNotFoundError:
        raise FileFormatError(name, f"missing from {os.path.dirname(path) or '.'}") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise FileFormatError(name, f"not valid JSON ({e})") from None
    if not isinstance(data, dict):
        raise FileFormatError(name, f"expected a JSON object, found {type(data).__name__}")
    return data


def open_safetensors(path: str) -> tuple[dict[str, Any], dict[str, str]]:
    """``(lazy handle, metadata)`` of a safetensors file, with a clear error for a truncated or corrupt one."""
    name = os.path.basename(path)
    if not os.path.isfile(path):
        raise FileFormatError(name, f"missing from {os.path.dirname(path) or '.'}")
    try:
        handle = safe_open(path, framework="pt", device="cpu")
    except (SafetensorError, OSError) as e:
        raise FileFormatError(
            name, f"not a readable safetensors file ({e}); it is truncated or corrupt: save or download it again"
        ) from None
    return handle, handle.metadata() or {}


def read_tensors(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    handle, metadata = open_safetensors(path)
    try:
        return {k: handle.get_tensor(k) for k in handle.keys()}, metadata
    except SafetensorError as e:  # pragma: no cover - the header check above catches truncation
        raise FileFormatError(os.path.basename(path), f"cannot read tensor data ({e})") from None


def state_dict_mismatch(expected: dict[str, torch.Tensor], found: dict[str, torch.Tensor]) -> str:
    missing = sorted(set(expected) - set(found))
    unexpected = sorted(set(found) - set(expected))
    wrong = [
        f"{k!r} is {list(found[k].shape)} but the architecture needs {list(expected[k].shape)}"
        for k in expected
        if k in found and tuple(found[k].shape) != tuple(expected[k].shape)
    ]
    parts = []
    if wrong:
        parts.append("shape mismatch: " + "; ".join(wrong[:3]) + (" ..." if len(wrong) > 3 else ""))
    if missing:
        parts.append(f"missing tensors: {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if unexpected:
        parts.append(f"unexpected tensors: {unexpected[:5]}{' ...' if len(unexpected) > 5 else ''}")
    return "; ".join(parts)


def transport_errors() -> tuple[type[BaseException], ...]:
    """Exceptions of huggingface_hub's HTTP stack that mean "the Hub was not reached" (not an HTTP answer)."""
    errors: list[type[BaseException]] = [ConnectionError, TimeoutError]
    for module in ("httpx2", "httpx"):  # huggingface_hub's HTTP client (httpx2 since 1.x)
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            continue
    return tuple(errors)
