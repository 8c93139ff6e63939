"""Checkpoints: ``checkpoint-<step>/`` holds the adapter in PEFT layout (adapter_config.json +
adapter_model.safetensors), ``trainer_state.json`` (step, epoch, the config, the data file's hash) and the
optimizer, scheduler and every process's RNG states as ``trainer_state.safetensors`` (tensors: Adam moments, RNG
states as integer tensors) + ``trainer_state_objects.json`` (everything else). Nothing is pickled, so a planted
checkpoint cannot run code; a legacy ``trainer_state.pt`` is refused, never loaded. Folders are written through
safeshape.io (hidden temporary sibling, one rename), so a crash never leaves a checkpoint that looks complete."""
from __future__ import annotations

import json
import os
import random
import re
import shutil
import tempfile
from dataclasses import MISSING, asdict, fields
from pathlib import Path

import numpy as np
import torch

from ..errors import SafeshapeError
from ..io import apply_umask, atomic_output_dir, install_files, recover_interrupted, write_json
from .config import RESUMABLE_CHANGES, TrainConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
STATE_JSON = "trainer_state.json"
STATE_TENSORS = "trainer_state.safetensors"
STATE_OBJECTS = "trainer_state_objects.json"
LEGACY_STATE = "trainer_state.pt"
_CKPT = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"  # temporaries of older versions (removed on --resume)


def encode_state(obj, tensors: dict[str, torch.Tensor], path: str = "s"):
    """``obj`` (dicts, lists, tuples, numbers, strings, None, tensors, numpy arrays) as JSON; tensors and arrays go
    to ``tensors`` under their path and are referenced by name. The inverse, :func:`decode_state`, builds nothing
    but these types."""
    if isinstance(obj, torch.Tensor):
        tensors[path] = obj.detach().cpu().clone().contiguous()
        return {"__tensor__": path}
    if isinstance(obj, np.ndarray):
        tensors[path] = torch.from_numpy(obj.astype(np.int64) if obj.dtype == np.uint32 else obj.copy())
        return {"__ndarray__": path, "dtype": str(obj.dtype)}
    if isinstance(obj, dict):
        return {"__dict__": [[encode_state(k, tensors, f"{path}.k{i}"), encode_state(v, tensors, f"{path}.{i}")]
                             for i, (k, v) in enumerate(obj.items())]}
    if isinstance(obj, (list, tuple)):
        items = [encode_state(v, tensors, f"{path}.{i}") for i, v in enumerate(obj)]
        return {"__tuple__": items} if isinstance(obj, tuple) else items
    if isinstance(obj, np.generic):
        return obj.item()
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"trainer state: cannot store a {type(obj).__name__} at {path}")


def decode_state(obj, tensors: dict[str, torch.Tensor], where: str):
    def tensor(name):
        if not isinstance(name, str) or name not in tensors:
            raise SafeshapeError(f"{where}: refers to tensor {name!r}, which {STATE_TENSORS} does not hold")
        return tensors[name]

    if isinstance(obj, list):
        return [decode_state(v, tensors, where) for v in obj]
    if isinstance(obj, dict):
        if "__tensor__" in obj:
            return tensor(obj["__tensor__"])
        if "__ndarray__" in obj:
            dtype = np.dtype(str(obj.get("dtype")))
            if dtype.kind not in "biuf":
                raise SafeshapeError(f"{where}: array dtype {dtype} is not numeric")
            return tensor(obj["__ndarray__"]).numpy().astype(dtype)
        if "__tuple__" in obj:
            return tuple(decode_state(v, tensors, where) for v in obj["__tuple__"])
        if "__dict__" in obj:
            return {decode_state(k, tensors, where): decode_state(v, tensors, where) for k, v in obj["__dict__"]}
        raise SafeshapeError(f"{where}: unexpected object with keys {sorted(obj)[:5]}")
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise SafeshapeError(f"{where}: unexpected value {obj!r}")


def rng_state() -> dict:
    """Every RNG the run draws from, as tensors and plain numbers (stored without pickling)."""
    version, words, gauss = random.getstate()
    state = {"torch": torch.get_rng_state(), "python": (version, torch.tensor(words, dtype=torch.int64), gauss),
             "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    version, words, gauss = state["python"]
    random.setstate((version, tuple(int(w) for w in torch.as_tensor(words).tolist()), gauss))
    np.random.set_state(tuple(state["numpy"]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_adapter_files(peft_model, folder: str, state_dict: dict[str, torch.Tensor] | None = None) -> None:
    """PEFT ``save_pretrained`` into ``folder`` (which must exist); ``state_dict``: the adapter's weights when the
    model holds only shards of them (--fsdp), named as ``peft_model.named_parameters()``."""
    if state_dict is None:
        peft_model.save_pretrained(folder, safe_serialization=True)
    else:
        peft_model.save_pretrained(folder, safe_serialization=True, state_dict=state_dict)
    for name in ADAPTER_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise RuntimeError(f"PEFT did not write {name} into {folder}")
        apply_umask(os.path.join(folder, name))


def save_checkpoint(out: str, step: int, peft_model, optimizer, scheduler, rng_states: list[dict],
                    config: TrainConfig, data_sha256: str, epoch: float,
                    adapter_state: dict[str, torch.Tensor] | None = None, optimizer_state: dict | None = None) -> str:
    """Write ``out/checkpoint-<step>`` atomically; returns its path. ``adapter_state`` / ``optimizer_state``: the
    full states gathered from shards (--fsdp) instead of the model's and the optimizer's own."""
    from safetensors.torch import save_file

    final = os.path.join(out, f"checkpoint-{step}")
    tensors: dict[str, torch.Tensor] = {}
    optimizer_state = optimizer.state_dict() if optimizer_state is None else optimizer_state
    objects = encode_state({"step": step, "optimizer": optimizer_state, "scheduler": scheduler.state_dict(),
                            "rng": rng_states}, tensors)
    # overwrite: only when a finished run is resumed and saves its last step again
    with atomic_output_dir(final, overwrite=True, what="checkpoint", ours=True) as tmp:
        save_adapter_files(peft_model, str(tmp), adapter_state)
        save_file(tensors, str(tmp / STATE_TENSORS))
        apply_umask(tmp / STATE_TENSORS)
        write_json(tmp / STATE_OBJECTS, objects)
        write_json(tmp / STATE_JSON, {"step": step, "epoch": epoch, "world_size": len(rng_states),
                                      "data_sha256": data_sha256, "config": asdict(config)})
    return final


def save_final_adapter(out: str, peft_model, adapter_state: dict[str, torch.Tensor] | None = None) -> None:
    """The final adapter lands in ``out`` itself (PEFT layout): staged in a temporary folder, then the weights
    and, last, ``adapter_config.json`` are renamed in (a kill in between leaves no config: not an adapter)."""
    tmp = Path(tempfile.mkdtemp(prefix=f".final-adapter.tmp-{os.getpid()}-", dir=out))
    try:
        save_adapter_files(peft_model, str(tmp), adapter_state)
        names = sorted(set(os.listdir(tmp)) - {"adapter_config.json"})  # the weights and PEFT's README.md
        install_files(tmp, Path(out), names + ["adapter_config.json"])
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def latest_checkpoint(out: str) -> str | None:
    """The newest complete checkpoint in ``out``; a checkpoint in the old pickle format is refused."""
    if not os.path.isdir(out):
        return None
    steps = []
    for name in os.listdir(out):
        if not (m := _CKPT.match(name)):
            continue
        folder = os.path.join(out, name)
        if os.path.isfile(os.path.join(folder, STATE_TENSORS)):
            steps.append(int(m.group(1)))
        elif os.path.lexists(os.path.join(folder, LEGACY_STATE)):
            raise SafeshapeError(f"--resume: {os.path.join(folder, LEGACY_STATE)} is a pickle (the format of older "
                                 "safeshape versions); it is never loaded, since unpickling a file can run any "
                                 "code. Start a new --out, or remove that checkpoint folder to resume from another")
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


def remove_stale_temporaries(out: str) -> None:
    """Temporaries of killed runs: checkpoints and final adapters being written, older versions' ``.tmp-*``."""
    recover_interrupted(out)
    for name in os.listdir(out):
        if name.startswith(TMP_PREFIX):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def _read_json(path: str):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise SafeshapeError(f"{path}: not found (an incomplete checkpoint)") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SafeshapeError(f"{path}: not valid JSON ({exc})") from None


def check_resumable(ckpt: str, config: TrainConfig, data_sha256: str, world_size: int) -> None:
    """Refuse to resume a run whose computation would differ (other data, hyper-parameters or process count)."""
    path = os.path.join(ckpt, STATE_JSON)
    saved = _read_json(path)
    if not (isinstance(saved, dict) and isinstance(saved.get("config"), dict)
            and {"data_sha256", "world_size"} <= saved.keys()):
        raise SafeshapeError(f"{path}: not a safeshape trainer state (needs config, data_sha256, world_size)")
    def as_saved(value):  # the JSON file holds tuples as lists
        return list(value) if isinstance(value, tuple) else value

    now = {key: as_saved(value) for key, value in asdict(config).items()}
    for key, value in saved["config"].items():
        if key in RESUMABLE_CHANGES or key not in now:
            continue
        mine = now[key]
        if mine != value:
            raise SafeshapeError(f"--resume from {ckpt}: --{key.replace('_', '-')} was {value!r} in that run, now "
                                 f"{mine!r}; resume with the same settings (or start a new --out)")
    # a setting newer than the checkpoint: that run computed with its default, so only the default continues it
    for f in fields(TrainConfig):
        if f.name in saved["config"] or f.name in RESUMABLE_CHANGES:
            continue
        default = f.default if f.default is not MISSING else (
            f.default_factory() if f.default_factory is not MISSING else MISSING)
        if default is MISSING:
            continue
        mine = now[f.name]
        if mine != as_saved(default):
            raise SafeshapeError(f"--resume from {ckpt}: that run was written before --{f.name.replace('_', '-')} "
                                 f"existed and ran with its default {default!r}, now {mine!r}; resume without it "
                                 "(or start a new --out)")
    if saved["data_sha256"] != data_sha256:
        raise SafeshapeError(f"--resume from {ckpt}: --data {config.data} changed since that checkpoint")
    if saved["world_size"] != world_size:
        raise SafeshapeError(f"--resume from {ckpt}: it ran on {saved['world_size']} processes, this run has "
                             f"{world_size}; the data order depends on the process count")


def load_checkpoint(ckpt: str, peft_model, optimizer, scheduler, rank: int) -> int:
    """Restore adapter weights, optimizer, scheduler and this process's RNG; returns the step."""
    from peft import set_peft_model_state_dict
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    device = next(p.device for p in peft_model.parameters())
    weights_path = os.path.join(ckpt, "adapter_model.safetensors")
    try:
        weights = load_file(weights_path, device=str(device))
    except (SafetensorError, OSError) as exc:
        raise SafeshapeError(f"{weights_path}: cannot be read ({exc})") from None
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise SafeshapeError(f"{ckpt}: adapter keys do not match the model: {result.unexpected_keys[:5]}")
    state = load_trainer_state(ckpt)
    if not (isinstance(state, dict) and {"step", "optimizer", "scheduler", "rng"} <= state.keys()
            and isinstance(state["rng"], list) and rank < len(state["rng"])):
        raise SafeshapeError(f"{os.path.join(ckpt, STATE_OBJECTS)}: not a safeshape trainer state for rank {rank}")
    try:
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        set_rng_state(state["rng"][rank])
        return int(state["step"])
    except (KeyError, IndexError, TypeError, ValueError, RuntimeError) as exc:
        raise SafeshapeError(f"{ckpt}: the trainer state does not fit this run ({type(exc).__name__}: {exc})"
                             ) from None


def load_trainer_state(ckpt: str) -> dict:
    """Optimizer, scheduler, RNG states and step from ``trainer_state.safetensors`` + its JSON (no pickle)."""
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    tensors_path = os.path.join(ckpt, STATE_TENSORS)
    try:
        tensors = load_file(tensors_path)
    except (SafetensorError, OSError) as exc:
        raise SafeshapeError(f"{tensors_path}: cannot be read ({exc})") from None
    objects_path = os.path.join(ckpt, STATE_OBJECTS)
    try:
        return decode_state(_read_json(objects_path), tensors, objects_path)
    except (TypeError, ValueError) as exc:  # e.g. an unhashable dict key, a bad dtype name
        raise SafeshapeError(f"{objects_path}: not a safeshape trainer state ({exc})") from None
