"""Loading a guard model from a local folder (no network)."""
from __future__ import annotations

from pathlib import Path

import torch

from ..errors import SafeshapeError


def load_guard(path, device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
               attn_implementation: str = "sdpa"):
    """(model, tokenizer) of a local Hugging Face causal-LM guard folder, model in eval mode on ``device``.

    Only local files are read (``local_files_only``). ``attn_implementation`` defaults to ``sdpa``, which the
    shared STAR engine needs (``eager`` works too; flash attention makes it fall back to the naive engine).
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = Path(path)
    if not folder.is_dir():
        raise SafeshapeError(f"guard folder {folder} does not exist or is not a directory (STAR loads local guards "
                             "only; download the model first)")
    if not (folder / "config.json").is_file():
        raise SafeshapeError(f"guard folder {folder} has no config.json: not a Hugging Face model folder")
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise SafeshapeError(f"guard folder {folder}: could not load the tokenizer: {exc}") from exc
    if getattr(tokenizer, "chat_template", None) is None:
        raise SafeshapeError(f"guard folder {folder}: the tokenizer has no chat template "
                             "(tokenizer_config.json 'chat_template' or chat_template.jinja)")
    import transformers

    # transformers 4.56 renamed torch_dtype to dtype
    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    dtype_kwarg = {"dtype" if (major, minor) >= (4, 56) else "torch_dtype": dtype}
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, local_files_only=True,
                                                     attn_implementation=attn_implementation, **dtype_kwarg)
    except Exception as exc:
        raise SafeshapeError(f"guard folder {folder}: could not load the model: {exc}") from exc
    return model.to(device).eval(), tokenizer
