"""Publishing: ``push_folder`` uploads a directory ``save_pretrained`` wrote, in one commit (main process only)."""

from __future__ import annotations

import os
import tempfile
from typing import Any

from .files import (
    CARD_NAME,
    OWN_FILES,
    RECOVERY_NAME,
    FileFormatError,
    HubUnreachableError,
    SavedState,
    transport_errors,
)
from .load import read_pruning_config, read_timm_config
from .save import save_pretrained


def push_to_hub(
    state: SavedState,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    save_format: str = "dense",
    token: str | bool | None = None,
    **save_kwargs: Any,
) -> str | None:
    """Save ``state`` and upload it to ``repo_id`` in one commit; returns the commit URL.

    Runs on the main process only (Accelerate's ``PartialState``); other processes return ``None`` at once
    (``PrunableModel.push_to_hub`` asks ``is_main_process()`` before it builds the state).
    ``save_kwargs`` go to ``save_pretrained`` (``base_model``, ``model_args``, ``card_template``).
    """
    if not is_main_process():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        folder = save_pretrained(state, os.path.join(tmp, "model"), save_format, repo_id=repo_id, **save_kwargs)
        if commit_message is None:
            architecture = (getattr(state.model, "pretrained_cfg", None) or {}).get("architecture", "model")
            commit_message = f"Upload {architecture} pruned with timm_prune ({state.config.method})"
        return push_folder(
            folder, repo_id, private=private, revision=revision, commit_message=commit_message, token=token
        )


def push_folder(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    commit_message: str | None = None,
    token: str | bool | None = None,
) -> str:
    """Upload a directory written by ``save_pretrained`` (its timm_prune files only) in one commit."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi

    folder = os.fspath(folder)
    pruning = read_pruning_config(folder)  # refuse to publish something from_pretrained would reject
    read_timm_config(folder)
    present = [name for name in OWN_FILES if os.path.isfile(os.path.join(folder, name))]
    for required in (pruning["weights_file"], CARD_NAME) + ((RECOVERY_NAME,) if pruning.get("report") else ()):
        if required not in present:
            raise FileFormatError(required, f"missing from {folder}; save the model again with save_pretrained")
    api = HfApi(token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        existing = set(api.list_repo_files(repo_id, revision=revision))
        operations: list[Any] = [CommitOperationAdd(name, os.path.join(folder, name)) for name in present]
        # A dense push must not leave an older compact file (or plot) behind, and vice versa.
        operations += [CommitOperationDelete(name) for name in OWN_FILES if name in existing and name not in present]
        info = api.create_commit(
            repo_id,
            operations=operations,
            commit_message=commit_message or "Upload timm_prune model",
            revision=revision,
        )
    except push_errors() as e:
        raise HubUnreachableError(repo_id, f"{type(e).__name__}: {e}", action="push") from e
    return info.commit_url


def push_errors() -> tuple[type[BaseException], ...]:
    """What a failed upload raises: the Hub not reached, or an HTTP error answer (401, 403, ...)."""
    from huggingface_hub.errors import HfHubHTTPError

    return (*transport_errors(), HfHubHTTPError)


def check_push_access(repo_id: str, *, private: bool = False, token: str | bool | None = None) -> str:
    """Create ``repo_id`` (or find it) now, so that a run that will push at its end fails before it trains.

    Returns the repo URL; raises ``HubUnreachableError`` ("could not push ...") when the Hub is not reached,
    the token is refused or the repo cannot be created."""
    from huggingface_hub import HfApi

    try:
        return str(HfApi(token=token).create_repo(repo_id, private=private, exist_ok=True))
    except push_errors() as e:
        raise HubUnreachableError(repo_id, f"{type(e).__name__}: {e}", action="push") from e


def is_main_process() -> bool:
    """Whether this is Accelerate's main process (always true without a launcher)."""
    try:
        from accelerate import PartialState
    except ImportError:  # pragma: no cover - accelerate is a dependency
        return True
    return PartialState().is_main_process
