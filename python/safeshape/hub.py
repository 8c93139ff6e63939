"""Hugging Face Hub ids wherever a model or adapter folder is accepted.

A path to an existing folder is used as it is. Anything else that is a valid hub repo id (``org/name``, with an
optional ``@revision``: a branch, tag or commit) is resolved to its snapshot folder through ``huggingface_hub``'s
cache, the same cache transformers and PEFT use. With ``HF_HUB_OFFLINE=1`` only the cache is read; otherwise a
missing snapshot is downloaded (model files only: safetensors, JSON, tokenizer files, chat templates).
"""
from __future__ import annotations

import os

from .errors import SafeshapeError

#: the files a model or adapter folder needs; skips .bin/.pth duplicates (e.g. Llama's original/*.pth)
MODEL_FILES = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "*.tiktoken", "*.py"]


def split_hub_id(name: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``name`` reads as a hub id (``org/name[@revision]``), else ``None``."""
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    repo_id, _, revision = name.partition("@")
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        return None
    return repo_id, revision or None


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
    from huggingface_hub import constants, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError

    offline = hub_offline()
    try:
        return snapshot_download(repo_id, revision=revision, local_files_only=offline,
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
                             f"{type(exc).__name__}: {exc}") from None


def portable_name(name_or_path: str | os.PathLike) -> str:
    """What to record as ``base_model_name_or_path``: a hub id as given, a local folder as an absolute path (so an
    adapter loads from any working directory)."""
    name = os.fspath(name_or_path)
    return os.path.abspath(name) if os.path.isdir(name) else name
