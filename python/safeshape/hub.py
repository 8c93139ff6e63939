"""Hugging Face Hub ids wherever a model or adapter folder is accepted.

A path to an existing folder is used as it is. Anything else that is a valid hub repo id (``org/name``, with an
optional ``@revision``: a commit hash, a branch or tag name without path components, or ``refs/pr/N``) is resolved to its snapshot folder through ``huggingface_hub``'s
cache, the same cache transformers and PEFT use. With ``HF_HUB_OFFLINE=1`` only the cache is read; otherwise a
missing snapshot is downloaded (model files only: safetensors, JSON, tokenizer files, chat templates).
"""
from __future__ import annotations

import os
import re

from .errors import SafeshapeError

#: the files a model or adapter folder needs; skips .bin/.pth duplicates (e.g. Llama's original/*.pth)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


#: a revision is a commit hash, a hub pull-request ref (``refs/pr/N``) or a branch/tag name without path components
#: (huggingface_hub reads ``refs/<revision>`` and ``snapshots/<commit>`` in the cache: a ``..`` would leave it)
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_REF = re.compile(r"^(?:refs/pr/[0-9]+|[A-Za-z0-9_][A-Za-z0-9._+-]*)$")


def check_revision(revision: str, what: str, name: str) -> None:
    if not _REF.match(revision) or ".." in revision or revision.endswith((".", ".lock")):
        raise SafeshapeError(f"{what} {name}: revision {revision!r} is neither a commit hash nor a branch or tag name "
                             "(letters, digits, . _ + -, no path components; or refs/pr/N)")


def split_hub_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` reads as a hub id (``org/name[@revision]``), else ``None``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, _, revision = name.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


def _check_snapshot(folder: str, repo_id: str, what: str, name: str) -> str:
    """The folder huggingface_hub returned must be ``<cache>/models--org--name/snapshots/<commit>``: a ref file
    whose content is not a commit hash (planted, or damaged) would otherwise lead outside the cache."""
    snapshot = os.path.normpath(os.path.abspath(folder))
    parent = os.path.dirname(snapshot)
    if os.path.basename(parent) != "snapshots" or not _COMMIT.match(os.path.basename(snapshot)) or \
            os.path.islink(snapshot) or os.path.basename(os.path.dirname(parent)) != \
            "models--" + repo_id.replace("/", "--"):
        raise SafeshapeError(f"{what} {name}: the Hugging Face cache resolves it to {folder}, which is not a snapshot "
                             f"folder of {repo_id} (snapshots/<commit hash>): a damaged or planted ref file; "
                             "download it again")
    return folder


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as huggingface_hub reads it, re-read now (it caches the value at import)."""
    from huggingface_hub import constants

    value = os.environ.get("HF_HUB_OFFLINE")
    return constants.HF_HUB_OFFLINE if value is None else value.strip().upper() in {"1", "ON", "YES", "TRUE"}


def resolve_folder(name_or_path: str | os.PathLike, what: str, allow_patterns: list[str] | None = None) -> str:
    """The local folder for ``name_or_path`` (a folder or a hub id); ``what`` names the argument in errors
    (``"--base"``). Raises :class:`SafeshapeError` when it is neither."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        return name
    if os.path.exists(name):
        raise SafeshapeError(f"{what} {name}: not a folder")
    try:
        parsed = split_hub_id(name)
    except ImportError:
        raise SafeshapeError(f"{what} {name}: no such folder (hub ids need huggingface_hub installed)") from None
    if parsed is None:
        raise SafeshapeError(f"{what} {name}: no such folder, and not a Hugging Face hub id (org/name[@revision])")
    repo_id, revision = parsed
    if revision is not None:
        check_revision(revision, what, name)
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        folder = snapshot_download(repo_id, revision=revision, local_files_only=offline,
                                   allow_patterns=allow_patterns or MODEL_FILES)
    except LocalEntryNotFoundError:
        if offline:
            raise SafeshapeError(f"{what} {name}: no such folder, and hub id {repo_id} (revision "
                                 f"{revision or 'main'}) is not in the Hugging Face cache {constants.HF_HUB_CACHE} "
                                 "while HF_HUB_OFFLINE is set: download it first (`hf download "
                                 f"{repo_id}`) or unset HF_HUB_OFFLINE") from None
        raise SafeshapeError(f"{what} {name}: no such folder, and the Hugging Face Hub cannot be reached for "
                             f"{repo_id} (nor is it in the cache {constants.HF_HUB_CACHE})") from None
    except (HfHubHTTPError, OSError, ValueError) as exc:
        raise SafeshapeError(f"{what} {name}: no such folder, and the hub id could not be resolved: "
                             f"{type(exc).__name__}: {exc}") from exc
    return _check_snapshot(folder, repo_id, what, name)


def portable_name(name_or_path: str | os.PathLike) -> str:
    """What to record as ``base_model_name_or_path``: a hub id as given, a local folder as an absolute path (so an
    adapter loads from any working directory)."""
    name = os.fspath(name_or_path)
    return os.path.abspath(name) if os.path.isdir(name) else name
