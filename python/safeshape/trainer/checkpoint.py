"""Checkpoints: ``checkpoint-<step>/`` holds the adapter in PEFT layout (adapter_config.json +
adapter_model.safetensors) and ``trainer_state.pt`` (optimizer, scheduler, every process's RNG states, step) +
``trainer_state.json`` (step, epoch, the config, the data file's hash). Folders are written to a hidden temporary
sibling and renamed, so a crash never leaves a checkpoint that looks complete."""
from __future__ import annotations

import hashlib
import json
import os
import random
import re
import shutil
from dataclasses import asdict

import numpy as np
import torch

from ..errors import SafeshapeError
from .config import RESUMABLE_CHANGES, TrainConfig

ADAPTER_FILES = ("adapter_config.json", "adapter_model.safetensors")
_CKPT = re.compile(r"^checkpoint-(\d+)$")
TMP_PREFIX = ".tmp-"


def file_sha256(path: str) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def rng_state() -> dict:
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


def save_adapter_files(peft_model, folder: str) -> None:
    """PEFT ``save_pretrained`` into ``folder`` (which must exist)."""
    peft_model.save_pretrained(folder, safe_serialization=True)
    for name in ADAPTER_FILES:
        if not os.path.isfile(os.path.join(folder, name)):
            raise RuntimeError(f"PEFT did not write {name} into {folder}")


def save_checkpoint(out: str, step: int, peft_model, optimizer, scheduler, rng_states: list[dict],
                    config: TrainConfig, data_sha256: str, epoch: float) -> str:
    """Write ``out/checkpoint-<step>`` atomically; returns its path."""
    final = os.path.join(out, f"checkpoint-{step}")
    tmp = os.path.join(out, f"{TMP_PREFIX}checkpoint-{step}.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_adapter_files(peft_model, tmp)
    torch.save({"step": step, "optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(),
                "rng": rng_states}, os.path.join(tmp, "trainer_state.pt"))
    with open(os.path.join(tmp, "trainer_state.json"), "w", encoding="utf-8") as f:
        json.dump({"step": step, "epoch": epoch, "world_size": len(rng_states), "data_sha256": data_sha256,
                   "config": asdict(config)}, f, indent=2)
    if os.path.exists(final):  # only when a finished run is resumed and saves its last step again
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def save_final_adapter(out: str, peft_model) -> None:
    """The final adapter lands in ``out`` itself; each file is renamed into place from a temporary folder."""
    tmp = os.path.join(out, f"{TMP_PREFIX}adapter.{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    save_adapter_files(peft_model, tmp)
    for name in os.listdir(tmp):
        os.replace(os.path.join(tmp, name), os.path.join(out, name))
    os.rmdir(tmp)


def latest_checkpoint(out: str) -> str | None:
    if not os.path.isdir(out):
        return None
    steps = [int(m.group(1)) for name in os.listdir(out) if (m := _CKPT.match(name))
             and os.path.isfile(os.path.join(out, name, "trainer_state.pt"))]
    return os.path.join(out, f"checkpoint-{max(steps)}") if steps else None


def remove_stale_temporaries(out: str) -> None:
    for name in os.listdir(out):
        if name.startswith(TMP_PREFIX):
            path = os.path.join(out, name)
            shutil.rmtree(path) if os.path.isdir(path) else os.remove(path)


def check_resumable(ckpt: str, config: TrainConfig, data_sha256: str, world_size: int) -> None:
    """Refuse to resume a run whose computation would differ (other data, hyper-parameters or process count)."""
    with open(os.path.join(ckpt, "trainer_state.json"), encoding="utf-8") as f:
        saved = json.load(f)
    now = asdict(config)
    for key, value in saved["config"].items():
        if key in RESUMABLE_CHANGES or key not in now:
            continue
        mine = list(now[key]) if isinstance(now[key], tuple) else now[key]
        if mine != value:
            raise SafeshapeError(f"--resume from {ckpt}: --{key.replace('_', '-')} was {value!r} in that run, now "
                                 f"{mine!r}; resume with the same settings (or start a new --out)")
    if saved["data_sha256"] != data_sha256:
        raise SafeshapeError(f"--resume from {ckpt}: --data {config.data} changed since that checkpoint")
    if saved["world_size"] != world_size:
        raise SafeshapeError(f"--resume from {ckpt}: it ran on {saved['world_size']} processes, this run has "
                             f"{world_size}; the data order depends on the process count")


def load_checkpoint(ckpt: str, peft_model, optimizer, scheduler, rank: int) -> int:
    """Restore adapter weights, optimizer, scheduler and this process's RNG; returns the step."""
    from peft import set_peft_model_state_dict
    from safetensors.torch import load_file

    device = next(p.device for p in peft_model.parameters())
    weights = load_file(os.path.join(ckpt, "adapter_model.safetensors"), device=str(device))
    result = set_peft_model_state_dict(peft_model, weights)
    if getattr(result, "unexpected_keys", None):
        raise SafeshapeError(f"{ckpt}: adapter keys do not match the model: {result.unexpected_keys[:5]}")
    state = torch.load(os.path.join(ckpt, "trainer_state.pt"), map_location="cpu", weights_only=False)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    set_rng_state(state["rng"][rank])
    return int(state["step"])
