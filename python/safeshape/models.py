"""The one model and tokenizer loader of every command (train, eval, star's guard, the demo) and the plumbing of
a causal LM that both trainers (ours and :mod:`safeshape.hf`) share: LoRA through PEFT, the decoder body and the
output head the fused loss ops take (so full logits are never materialised).

Loading reads a local folder (hub ids are resolved to their cache snapshot first: :mod:`safeshape.hub`), with
``local_files_only`` and safetensors only: a ``pytorch_model.bin`` is a pickle, and no file we are handed is
unpickled. Errors name the flag and the folder."""
from __future__ import annotations

import os
from collections.abc import Callable

import torch
from torch import Tensor, nn

from .errors import SafeshapeError


def check_model_folder(folder: str | os.PathLike, flag: str = "--model") -> None:
    """``folder`` holds a Hugging Face model (its config.json)."""
    if not os.path.isfile(os.path.join(folder, "config.json")):
        raise SafeshapeError(f"{flag} {os.fspath(folder)}: no config.json (a local Hugging Face model folder is "
                             "needed)")


def load_tokenizer(folder: str | os.PathLike, flag: str = "--model",
                   check: Callable[[object, str], None] | None = None, model_folder: bool = False):
    """The tokenizer in ``folder``, after ``check(tokenizer, "FLAG FOLDER")`` (default: the trainer's
    :func:`safeshape.data.check_chat_tokenizer`; eval passes its generation check, star its guard's).
    ``model_folder``: the folder must hold the model too (its config.json), checked first."""
    from transformers import AutoTokenizer

    from .data import check_chat_tokenizer

    if model_folder:
        check_model_folder(folder, flag)
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as exc:
        raise SafeshapeError(f"{flag} {os.fspath(folder)}: cannot load a tokenizer ({exc})") from exc
    (check or check_chat_tokenizer)(tokenizer, f"{flag} {os.fspath(folder)}")
    return tokenizer


def load_causal_lm(folder: str | os.PathLike, dtype: torch.dtype | str = "auto", flag: str = "--model", **kwargs):
    """``AutoModelForCausalLM`` from the model folder ``folder``: safetensors only, local files only; ``dtype`` a
    torch dtype, its name, or ``"auto"`` (the checkpoint's); ``kwargs`` go to ``from_pretrained``
    (``attn_implementation``, ``quantization_config``, ...). The model stays where transformers puts it."""
    from transformers import AutoModelForCausalLM

    check_model_folder(folder, flag)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    try:
        return AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, local_files_only=True, use_safetensors=True,
                                                    **kwargs)
    except SafeshapeError:
        raise
    except Exception as exc:
        raise SafeshapeError(f"{flag} {os.fspath(folder)}: cannot load the model ({exc})") from exc


def meta_model(folder: str | os.PathLike, flag: str = "--model"):
    """The model's modules with the shapes its config gives, on the meta device (no memory, no weights read): what
    adapters are checked against before anything loads."""
    from transformers import AutoConfig, AutoModelForCausalLM

    try:
        config = AutoConfig.from_pretrained(folder, local_files_only=True)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config)
    except Exception as exc:
        raise SafeshapeError(f"{flag} {os.fspath(folder)}: cannot build the model from its config.json "
                             f"({exc})") from None


def load_model(model_dir: str, dtype: torch.dtype | str, device: torch.device,
               quantize: int | None = None) -> nn.Module:
    """The policy to train in ``model_dir`` on ``device`` (:func:`load_causal_lm`), its head checked for the fused
    loss. ``quantize`` 4 or 8: the base's Linear layers through bitsandbytes (NF4 with double quantization, or
    LLM.int8), computing in ``dtype``; the output head stays unquantized (transformers skips it), which the fused
    loss needs."""
    check_model_folder(model_dir)
    if isinstance(dtype, str) and dtype != "auto":
        dtype = getattr(torch, dtype)
    extra = {}
    if quantize:
        extra = dict(quantization_config=quantization_config(model_dir, dtype, quantize),
                     device_map={"": device})  # a quantized model cannot be moved by .to()
    model = load_causal_lm(model_dir, dtype, **extra)
    check_fused_head(model, f"--model {model_dir}")
    return model if quantize else model.to(device)


def quantization_config(model_dir: str, dtype: torch.dtype | str, bits: int):
    """transformers' ``BitsAndBytesConfig`` for ``--load-in-4bit`` / ``--load-in-8bit``."""
    flag = f"--load-in-{bits}bit"
    try:
        import bitsandbytes  # noqa: F401
        from transformers import BitsAndBytesConfig
    except ImportError as exc:
        raise SafeshapeError(f"{flag}: needs the bitsandbytes package (pip install bitsandbytes): {exc}") from None
    if dtype == "auto":
        from transformers import AutoConfig

        config = AutoConfig.from_pretrained(model_dir, local_files_only=True)
        dtype = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    if bits == 4:
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                  bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def enable_checkpointing(model: nn.Module) -> None:
    """Activation (gradient) checkpointing of the decoder layers, non-reentrant (LoRA needs no input grads)."""
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5 (the old name is deprecated there)
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    elif getattr(model, "supports_gradient_checkpointing", False):
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    else:
        raise SafeshapeError(f"--gradient-checkpointing: {type(model).__name__} does not support it")


def check_fused_head(model: nn.Module, source: str) -> None:
    """The fused ops compute ``logits = h W^T`` from the final hidden states; refuse heads that do more."""
    config = model.config
    for attr in ("final_logit_softcapping", "logit_scale", "output_multiplier_scale", "logits_scaling"):
        value = getattr(config, attr, None)
        if value not in (None, 1, 1.0):
            raise SafeshapeError(f"{source}: config.{attr}={value}; the fused loss takes logits = hidden @ "
                                 "lm_head.weight^T and cannot apply logit scaling or soft-capping")
    head = model.get_output_embeddings()
    if not isinstance(head, nn.Linear) or head.bias is not None:
        raise SafeshapeError(f"{source}: the output embedding must be a Linear without bias for the fused loss")
    if not head.weight.dtype.is_floating_point:
        raise SafeshapeError(f"{source}: the output head is quantized ({type(head.weight).__name__}, "
                             f"{head.weight.dtype}); the fused loss reads its weight as a float matrix, so leave the "
                             "head out of quantization (llm_int8_skip_modules)")


def linear_module_names(model: nn.Module) -> list[str]:
    """Distinct leaf names of the Linear layers (what ``--target-modules`` can name)."""
    return sorted({name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, nn.Linear)})


def apply_lora(model: nn.Module, r: int, alpha: float, dropout: float, target_modules: tuple[str, ...]) -> nn.Module:
    """Wrap ``model`` in a PEFT LoRA adapter on the named modules (leaf names, as PEFT matches a list), or on every
    Linear but the output head for ``("all-linear",)`` (PEFT's own rule)."""
    from peft import LoraConfig, get_peft_model

    linear_names = linear_module_names(model)
    names = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
    head_name = next((n for n, m in model.named_modules() if m is model.get_output_embeddings()), None)
    all_linear = tuple(target_modules) == ("all-linear",)
    matched = [n for n in names if n.rsplit(".", 1)[-1] in target_modules or n in target_modules or
               (all_linear and n != head_name)]
    if not matched:
        raise SafeshapeError(f"--target-modules {','.join(target_modules)}: matches no Linear layer of the model; "
                             f"its Linear layers are named {linear_names}")
    if head_name in matched:
        raise SafeshapeError(f"--target-modules: `{head_name}` is the output head; the fused loss reads the head's "
                             "frozen weight directly, so it cannot carry LoRA")
    config = LoraConfig(r=r, lora_alpha=alpha, lora_dropout=dropout,
                        target_modules="all-linear" if all_linear else list(target_modules),
                        bias="none", task_type="CAUSAL_LM")
    return get_peft_model(model, config)


def hf_model(model: nn.Module) -> nn.Module:
    """The transformers model inside DDP/PEFT wrappers."""
    while hasattr(model, "module") and isinstance(model.module, nn.Module):
        model = model.module
    if hasattr(model, "get_base_model"):
        model = model.get_base_model()
    return model


def body_and_head(model: nn.Module) -> tuple[nn.Module, Tensor]:
    """``(decoder body, lm_head weight [V, H])``: the body returns the final (normed) hidden states."""
    inner = hf_model(model)
    body = getattr(inner, inner.base_model_prefix, None)
    if body is None or body is inner:
        raise SafeshapeError(f"{type(inner).__name__}: cannot find the decoder body "
                             f"(`{inner.base_model_prefix}` attribute)")
    return body, inner.get_output_embeddings().weight
