"""PEFT LoRA adapters on disk: parse, validate, and map every adapted module to its checkpoint key by name.

Layout: ``adapter_config.json`` + ``adapter_model.safetensors`` with keys
``base_model.model.<path>.lora_A.weight`` (``[r, d_in]``) and ``...lora_B.weight`` (``[d_out, r]``); the checkpoint
key is ``<path>.weight``. Anything Safe LoRA cannot handle correctly is refused with the file and key at fault.
"""
from __future__ import annotations

import math
import os
import re
import shutil
import stat
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError
from .checkpoint import check_finite, read_json_object, read_safetensors_header, read_tensor

CONFIG = "adapter_config.json"
WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."
_LORA_KEY = re.compile(r"^(?P<path>.+)\.lora_(?P<ab>A|B)(?:\.(?P<adapter>[^.]+))?\.(?P<param>weight|bias)$")


@dataclass
class LoraModule:
    name: str          # module path in the model, e.g. model.layers.0.self_attn.q_proj
    key_a: str         # adapter keys
    key_b: str
    weight_key: str    # checkpoint key of the adapted weight
    r: int
    alpha: float
    d_out: int
    d_in: int
    fan_in_fan_out: bool


def _pattern_value(name: str, pattern: dict, default):
    # PEFT's rule: a pattern key matches a module whose name ends with it at a dot boundary (regex allowed)
    for key, value in (pattern or {}).items():
        if re.match(rf"(.*\.)?({key})$", name):
            return value
    return default


def _matches_target(name: str, target_modules) -> bool:
    if target_modules is None or target_modules == "all-linear":
        return True
    if isinstance(target_modules, str):
        return re.fullmatch(target_modules, name) is not None
    return any(name == t or name.endswith("." + t) for t in target_modules)


def _is_int(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool)


def _is_number(x) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def _check_regex(pattern: str, where: str) -> None:
    try:
        re.compile(pattern)
    except re.error as exc:
        raise CheckpointError(f"{where}: {pattern!r} is not a valid regular expression ({exc})") from None


def check_adapter_config(cfg: dict, path: Path) -> dict:
    """The fields Safe LoRA reads from ``adapter_config.json``, with the types PEFT gives them."""
    def bad(key: str, want: str):
        return CheckpointError(f"{path}: {key} must be {want}, not {cfg[key]!r}")

    if "r" in cfg and not (_is_int(cfg["r"]) and cfg["r"] > 0):
        raise bad("r", "a positive integer")
    if "lora_alpha" in cfg and not _is_number(cfg["lora_alpha"]):
        raise bad("lora_alpha", "a number")
    for key in ("fan_in_fan_out", "use_dora", "lora_bias"):
        if cfg.get(key) is not None and not isinstance(cfg[key], bool):
            raise bad(key, "true or false")
    if cfg.get("peft_type") is not None and not isinstance(cfg["peft_type"], str):
        raise bad("peft_type", "a string")
    tm = cfg.get("target_modules")
    if isinstance(tm, str):
        _check_regex(tm, f"{path}: target_modules")
    elif tm is not None and not (isinstance(tm, list) and all(isinstance(t, str) for t in tm)):
        raise bad("target_modules", "a list of module names or a regex string")
    for key, check, want in (("rank_pattern", lambda v: _is_int(v) and v > 0, "positive integers"),
                             ("alpha_pattern", _is_number, "numbers")):
        pattern = cfg.get(key)
        if pattern is None:
            continue
        if not isinstance(pattern, dict):
            raise bad(key, f"an object of module patterns to {want}")
        for k, v in pattern.items():
            _check_regex(k, f"{path}: {key} key")
            if not check(v):
                raise CheckpointError(f"{path}: {key}[{k!r}] must be one of {want}, not {v!r}")
    return cfg


def _hub_blob_link(p: Path) -> bool:
    """A Hugging Face hub cache snapshot's file: a symlink from ``models--*/snapshots/<rev>/`` into the same repo's
    ``blobs/`` (how huggingface_hub stores every downloaded file). Such files are copied like regular files."""
    snap = p.parent
    repo = snap.parent.parent
    if not (snap.parent.name == "snapshots" and repo.name.startswith("models--")):
        return False
    return Path(os.path.realpath(p)).parent == Path(os.path.realpath(repo / "blobs"))


def check_adapter_folder(folder: Path) -> list[str]:
    """Refuse special files (FIFOs, sockets, devices: copying one would hang or read a device) and dangling
    symlinks; other symlinks are allowed and reported (outputs keep them as links, never copy what they point
    to), except a hub cache snapshot's links into its own blobs, which are its files. Returns the warnings."""
    warnings = []
    for p in sorted(folder.iterdir()):
        st = p.lstat()
        if stat.S_ISLNK(st.st_mode):
            if not p.exists():
                raise CheckpointError(f"adapter {folder}: {p.name} is a dangling symlink (to {os.readlink(p)})")
            st = p.stat()
            if _hub_blob_link(p):
                if not stat.S_ISREG(st.st_mode):
                    raise CheckpointError(f"adapter {folder}: {p.name} points to a hub blob that is not a regular "
                                          "file")
                continue
            warnings.append(f"{p} is a symlink to {p.resolve()}; kept as a link (to that absolute path) in the "
                            "output")
        if not (stat.S_ISREG(st.st_mode) or stat.S_ISDIR(st.st_mode)):
            raise CheckpointError(f"adapter {folder}: {p.name} is not a regular file or folder (a FIFO, socket "
                                  "or device); remove it from the adapter folder")
    return warnings


def copy_adapter_files(src: Path, dst: Path, skip: set[str]) -> None:
    """Copy the top-level files of adapter folder ``src`` into ``dst`` (sub-folders and ``skip`` are left out);
    a symlink stays a symlink, to its absolute target, except a hub cache snapshot's links into its blobs, which are
    copied (see :func:`check_adapter_folder`)."""
    for p in sorted(Path(src).iterdir()):
        if p.name in skip or (p.is_dir() and not p.is_symlink()):
            continue
        if p.is_symlink() and not _hub_blob_link(p):
            if not p.is_dir():
                os.symlink(os.path.realpath(p), dst / p.name)
        else:
            shutil.copy2(p, dst / p.name)


class Adapter:
    """A LoRA adapter folder, fully loaded (adapters are small)."""

    def __init__(self, folder):
        self.folder = Path(folder)
        cfg_path = self.folder / CONFIG
        w_path = self.folder / WEIGHTS
        if not self.folder.is_dir():
            raise CheckpointError(f"adapter {self.folder}: not a folder")
        self.folder_warnings = check_adapter_folder(self.folder)
        if not cfg_path.exists():
            subs = sorted(p.name for p in self.folder.iterdir() if (p / CONFIG).exists())
            if subs:
                raise CheckpointError(f"adapter {self.folder}: no {CONFIG} here, but several adapters below it "
                                      f"({', '.join(subs)}): pass one adapter's folder")
            raise CheckpointError(f"adapter {self.folder}: {CONFIG} not found")
        if not w_path.exists():
            hint = " (adapter_model.bin is not read: save with safe_serialization=True)" if (
                self.folder / "adapter_model.bin").exists() else ""
            raise CheckpointError(f"adapter {self.folder}: {WEIGHTS} not found{hint}")
        self.config = check_adapter_config(read_json_object(cfg_path), cfg_path)
        self.config_path, self.weights_path = cfg_path, w_path
        infos, self.metadata = read_safetensors_header(w_path)
        self.tensors = {k: read_tensor(v, k) for k, v in infos.items()}
        for key, t in self.tensors.items():
            if _LORA_KEY.match(key):
                check_finite(t, f"{w_path}: tensor {key!r}")
        self.warnings: list[str] = list(self.folder_warnings)
        self.modules = self._parse()

    def _parse(self) -> list[LoraModule]:
        cfg, wf = self.config, self.weights_path
        peft_type = cfg.get("peft_type", "LORA")
        if str(peft_type).upper() != "LORA":
            raise CheckpointError(f"{self.config_path}: peft_type is {peft_type!r}; Safe LoRA needs a LORA adapter")
        if cfg.get("use_dora"):
            raise CheckpointError(f"{self.config_path}: use_dora is true; DoRA adapters are not supported (the "
                                  "magnitude vector rescales W + dW, so projecting B alone is not Safe LoRA)")
        if cfg.get("lora_bias"):
            raise CheckpointError(f"{self.config_path}: lora_bias is true; adapters with a lora_B bias are not "
                                  "supported")
        fan_in_fan_out = bool(cfg.get("fan_in_fan_out", False))
        r_default, alpha_default = cfg.get("r", 8), cfg.get("lora_alpha", 8)
        parts: dict[str, dict[str, str]] = {}
        adapter_names = set()
        for key in self.tensors:
            if "lora_magnitude_vector" in key:
                raise CheckpointError(f"{wf}: key {key!r} is a DoRA magnitude vector; DoRA is not supported")
            if "lora_embedding_A" in key or "lora_embedding_B" in key:
                raise CheckpointError(f"{wf}: key {key!r} is an embedding LoRA; only Linear modules are supported")
            m = _LORA_KEY.match(key)
            if not m:
                continue  # modules_to_save copies and other tensors pass through unchanged
            if m["param"] == "bias":
                raise CheckpointError(f"{wf}: key {key!r} is a lora_{m['ab']} bias; not supported")
            if m["adapter"]:
                adapter_names.add(m["adapter"])
            path = m["path"]
            parts.setdefault(path, {})[m["ab"]] = key
        if len(adapter_names) > 1:
            raise CheckpointError(f"{wf}: holds several adapters ({', '.join(sorted(adapter_names))}); save them "
                                  "to separate folders and project each")
        modules = []
        for path, ab in sorted(parts.items()):
            if "A" not in ab or "B" not in ab:
                have, miss = ("lora_A", "lora_B") if "A" in ab else ("lora_B", "lora_A")
                raise CheckpointError(f"{wf}: key {ab.get('A') or ab.get('B')!r} ({have}) has no matching {miss}")
            a, b = self.tensors[ab["A"]], self.tensors[ab["B"]]
            if a.dim() != 2 or b.dim() != 2:
                bad = ab["A"] if a.dim() != 2 else ab["B"]
                raise CheckpointError(f"{wf}: key {bad!r} has shape {list(self.tensors[bad].shape)}; only 2-D "
                                      "(Linear) LoRA is supported, not conv LoRA")
            if not (a.is_floating_point() and b.is_floating_point()):
                raise CheckpointError(f"{wf}: key {ab['A']!r} is not a floating-point tensor")
            r = a.shape[0]
            if b.shape[1] != r:
                raise CheckpointError(f"{wf}: rank mismatch for {path}: {ab['A']!r} is {list(a.shape)} (r={r}) but "
                                      f"{ab['B']!r} is {list(b.shape)}")
            name = path[len(PREFIX):] if path.startswith(PREFIX) else path
            want_r = _pattern_value(name, cfg.get("rank_pattern"), r_default)
            alpha = _pattern_value(name, cfg.get("alpha_pattern"), alpha_default)
            if want_r != r:
                raise CheckpointError(f"{wf}: {ab['A']!r} has rank {r} but {self.config_path} gives r={want_r} for "
                                      f"{name} (r / rank_pattern)")
            if not _matches_target(name, cfg.get("target_modules")):
                self.warnings.append(f"{name} is adapted but does not match target_modules "
                                     f"{cfg.get('target_modules')!r}")
            modules.append(LoraModule(name=name, key_a=ab["A"], key_b=ab["B"], weight_key=f"{name}.weight", r=r,
                                      alpha=float(alpha), d_out=b.shape[0], d_in=a.shape[1],
                                      fan_in_fan_out=fan_in_fan_out))
        if not modules:
            raise CheckpointError(f"{wf}: no lora_A/lora_B pairs found")
        return modules

    def lora_a(self, m: LoraModule) -> torch.Tensor:
        return self.tensors[m.key_a]

    def lora_b(self, m: LoraModule) -> torch.Tensor:
        return self.tensors[m.key_b]


def recorded_base(folder) -> str | None:
    """``base_model_name_or_path`` from an adapter's ``adapter_config.json`` (None when absent or unreadable)."""
    import json

    try:
        value = json.loads((Path(folder) / CONFIG).read_text()).get("base_model_name_or_path")
    except (OSError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) and value.strip() else None


def _same_model(recorded: str, folder: str, given: str | None) -> bool:
    if recorded in (folder, given):
        return True
    if os.path.exists(recorded) and os.path.exists(folder):
        try:
            return os.path.samefile(recorded, folder)
        except OSError:
            return False
    # a hub id recorded, its snapshot folder given (huggingface_hub's cache: .../models--org--name/snapshots/rev)
    return ("models--" + recorded.split("@")[0].replace("/", "--")) in Path(folder).resolve().parts


def base_mismatch(adapter, folder: str, given: str | None = None, role: str = "model") -> str | None:
    """A warning when the adapter's recorded base (``adapter_config.json`` ``base_model_name_or_path``) is not the
    model it is used with (``folder``, passed on the command line as ``given``), else None. Shapes can agree
    while the weights do not: an adapter trained from the unaligned base, evaluated or projected as if it were
    trained from the aligned model, which Safe LoRA assumes."""
    rec = recorded_base(adapter)
    if rec is None or _same_model(rec, str(folder), given):
        return None
    return (f"adapter {adapter}: its adapter_config.json records base_model_name_or_path {rec!r}, but it is used "
            f"with {role} {given or folder}; if it was trained from another model (e.g. the unaligned base), its "
            "results (and Safe LoRA, which assumes an adapter trained from the aligned model) are not what they "
            "seem")
