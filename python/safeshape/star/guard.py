"""Loading a guard model from a local folder or a hub id (through the Hugging Face cache; see safeshape.hub)."""
from __future__ import annotations

import os
from pathlib import Path

import torch

from ..errors import SafeshapeError
from ..hub import resolve_folder


def load_guard(path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa"):
    """(model, tokenizer) of a Hugging Face causal-LM guard, model in eval mode on ``device``.

    ``path`` is a local folder or a hub id (``meta-llama/Llama-Guard-3-1B``) resolved through the Hugging Face
    cache (:func:`safeshape.hub.resolve_folder`; ``HF_HUB_OFFLINE=1`` reads the cache only); the model and
    tokenizer are then read from that folder (``local_files_only``). ``attn_implementation`` defaults to ``sdpa``,
    which the shared STAR engine needs (``eager`` works too; flash attention makes it fall back to the naive engine).
    """
    from ..models import load_causal_lm

    folder = Path(resolve_folder(path, "guard"))
    tokenizer = load_guard_tokenizer(folder)
    model = load_causal_lm(folder, dtype, "guard folder", attn_implementation=attn_implementation)
    return model.to(device).eval(), tokenizer


def load_guard_tokenizer(folder: str | os.PathLike, what: str = "guard folder"):
    """A guard folder's tokenizer, after checking the folder is a Hugging Face model with a chat template (the
    guard is asked through its own template); errors name ``what`` and the folder."""
    from ..models import load_tokenizer

    return load_tokenizer(folder, what, check=check_guard_tokenizer, model_folder=True)


def check_guard_tokenizer(tokenizer, source: str) -> None:
    if not getattr(tokenizer, "chat_template", None):
        raise SafeshapeError(f"{source}: the tokenizer has no chat template (tokenizer_config.json 'chat_template' "
                             "or chat_template.jinja); the guard is asked through its own template")
