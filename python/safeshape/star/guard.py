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
    from transformers import AutoModelForCausalLM

    folder = Path(resolve_folder(path, "guard"))
    tokenizer = load_guard_tokenizer(folder)
    import transformers

    # transformers 4.56 renamed torch_dtype to dtype
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kwarg = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
    try:  # safetensors only: a pytorch_model.bin is a pickle, and no file we are handed is unpickled
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True, use_safetensors=True,
                                                     attn_implementation=attn_implementation, **dtype_kwarg)
    except Exception as exc:
        raise SafeshapeError(f"guard folder {folder}: could not load the model: {exc}") from exc
    return model.to(device).eval(), tokenizer


def load_guard_tokenizer(folder: str | os.PathLike, what: str = "guard folder"):
    """A guard folder's tokenizer, after checking the folder is a Hugging Face model with a chat template (the
    guard is asked through its own template); errors name ``what`` and the folder."""
    from transformers import AutoTokenizer

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise SafeshapeError(f"{what} {folder}: no config.json (not a Hugging Face model folder)")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise SafeshapeError(f"{what} {folder}: could not load the tokenizer: {exc}") from exc
    if not getattr(tokenizer, "chat_template", None):
        raise SafeshapeError(f"{what} {folder}: the tokenizer has no chat template (tokenizer_config.json "
                             "'chat_template' or chat_template.jinja); the guard is asked through its own template")
    return tokenizer
