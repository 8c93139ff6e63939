"""PEFT adapters for ``safeshape eval``: ``--adapter [NAME=]PATH`` and the check that an adapter fits the base model."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import SafeshapeError


def parse_adapter(spec: str) -> tuple[str, str]:
    """``NAME=PATH`` or ``PATH`` (named after its folder)."""
    name, sep, path = spec.partition("=")
    if not sep:
        path = spec
        name = Path(spec.rstrip("/")).name or spec
    if not name or not path:
        raise SafeshapeError(f"--adapter {spec!r}: expected PATH or NAME=PATH")
    return name, path


def check_adapter(model, folder: str) -> None:
    """Refuse an adapter that was not made for this base model: every LoRA module it adapts must exist in the base
    with the shapes its ``lora_A`` (``[r, in]``) and ``lora_B`` (``[out, r]``) imply. Errors name the adapter and key."""
    from ..safelora.checkpoint import read_safetensors_header

    folder_p = Path(folder)
    cfg_path, w_path = folder_p / "adapter_config.json", folder_p / "adapter_model.safetensors"
    if not cfg_path.is_file():
        raise SafeshapeError(f"--adapter {folder}: no adapter_config.json (a PEFT adapter folder is needed)")
    if not w_path.is_file():
        raise SafeshapeError(f"--adapter {folder}: no adapter_model.safetensors (save with safe_serialization=True)")
    try:
        cfg = json.loads(cfg_path.read_text())
    except json.JSONDecodeError as exc:
        raise SafeshapeError(f"{cfg_path}: invalid JSON: {exc}") from None
    if str(cfg.get("peft_type", "LORA")).upper() != "LORA":
        raise SafeshapeError(f"{cfg_path}: peft_type {cfg.get('peft_type')!r}; safeshape eval loads LoRA adapters")
    infos, _ = read_safetensors_header(w_path)
    modules = dict(model.named_modules())
    for key, info in infos.items():
        for part, dim in ((".lora_A.", 1), (".lora_B.", 0)):
            if part not in key or not key.endswith(".weight"):
                continue
            path = key.split(part)[0]
            path = path[len("base_model.model."):] if path.startswith("base_model.model.") else path
            mod = modules.get(path)
            if mod is None:
                raise SafeshapeError(f"--adapter {folder}: was not made for this base model: {w_path} key {key!r} "
                                     f"adapts {path!r}, which the base model does not have")
            want = getattr(mod, "in_features" if dim == 1 else "out_features", None)
            if want is None and isinstance(getattr(mod, "weight", None), torch.Tensor):
                want = mod.weight.shape[1 - dim]
            if want is not None and len(info.shape) == 2 and info.shape[dim] != want:
                raise SafeshapeError(f"--adapter {folder}: was not made for this base model: {w_path} key {key!r} has "
                                     f"shape {list(info.shape)}, but {path!r} in the base model has "
                                     f"{'in' if dim == 1 else 'out'}_features {want}")
