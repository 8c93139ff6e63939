"""Read HF checkpoints and PEFT adapters one tensor at a time, without mapping whole files.

A folder holds ``model.safetensors`` or shards listed by ``model.safetensors.index.json``. Each tensor is read
with a seek + read into a fresh buffer, so memory holds only the tensors the caller keeps (an mmap would leave
every page it touched resident, and peak RSS would grow to the checkpoint's size).
"""
from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from ..errors import CheckpointError

_DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
_HEADER_LIMIT = 100 * 1024 * 1024


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header: ``({name: TensorInfo}, metadata)``; errors name the file."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            if n > _HEADER_LIMIT:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible)")
            header = f.read(n)
            size = os.fstat(f.fileno()).st_size
    except FileNotFoundError as exc:
        raise CheckpointError(f"{path}: file not found") from exc
    try:
        meta = json.loads(header)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not JSON: {exc})") from exc
    metadata = meta.pop("__metadata__", None) or {}
    start = 8 + n
    out = {}
    for name, info in meta.items():
        try:
            dtype = _DTYPES[info["dtype"]]
            b, e = info["data_offsets"]
            shape = tuple(int(s) for s in info["shape"])
        except KeyError as exc:
            raise CheckpointError(f"{path}: tensor {name!r} has an unsupported or missing field {exc}") from exc
        if start + e > size:
            raise CheckpointError(f"{path}: tensor {name!r} runs past the end of the file (truncated?)")
        out[name] = TensorInfo(path, dtype, shape, start + b, start + e)
    return out, metadata


def read_tensor(info: TensorInfo, name: str = "?") -> torch.Tensor:
    nbytes = info.end - info.begin
    buf = torch.empty(nbytes, dtype=torch.uint8)
    with open(info.file, "rb") as f:
        f.seek(info.begin)
        got = f.readinto(memoryview(buf.numpy()))
    if got != nbytes:
        raise CheckpointError(f"{info.file}: tensor {name!r} is truncated ({got} of {nbytes} bytes)")
    numel = 1
    for s in info.shape:
        numel *= s
    if numel * info.dtype.itemsize != nbytes:
        raise CheckpointError(f"{info.file}: tensor {name!r} has {nbytes} bytes for shape {list(info.shape)} "
                              f"of {info.dtype}")
    if nbytes == 0:
        return torch.empty(info.shape, dtype=info.dtype)
    return buf.view(info.dtype).reshape(info.shape)


class Checkpoint:
    """A HF model folder (single or sharded safetensors), read one tensor at a time."""

    INDEX = "model.safetensors.index.json"
    SINGLE = "model.safetensors"

    def __init__(self, folder: str | os.PathLike, role: str = "checkpoint"):
        self.folder = Path(folder)
        self.role = role
        if not self.folder.is_dir():
            raise CheckpointError(f"{role} checkpoint {self.folder}: not a folder")
        index = self.folder / self.INDEX
        single = self.folder / self.SINGLE
        self._tensors: dict[str, TensorInfo] = {}
        if index.exists():
            try:
                weight_map = json.loads(index.read_text())["weight_map"]
            except (json.JSONDecodeError, KeyError) as exc:
                raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map'): {exc}") from exc
            headers: dict[str, dict[str, TensorInfo]] = {}
            for key, shard in weight_map.items():
                if shard not in headers:
                    headers[shard], _ = read_safetensors_header(self.folder / shard)
                if key not in headers[shard]:
                    raise CheckpointError(f"{index}: key {key!r} is mapped to {shard}, which does not contain it")
                self._tensors[key] = headers[shard][key]
        elif single.exists():
            self._tensors, _ = read_safetensors_header(single)
        else:
            found = sorted(p.name for p in self.folder.iterdir())
            hint = " (.bin checkpoints are not read: convert to safetensors)" if any(
                n.endswith(".bin") for n in found) else ""
            raise CheckpointError(f"{role} checkpoint {self.folder}: no {self.SINGLE} or {self.INDEX}{hint}")
        self.config = self._read_config()

    def _read_config(self) -> dict | None:
        p = self.folder / "config.json"
        if not p.exists():
            return None
        try:
            return json.loads(p.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{p}: invalid JSON: {exc}") from exc

    def __contains__(self, key: str) -> bool:
        return key in self._tensors

    def keys(self):
        return self._tensors.keys()

    def info(self, key: str) -> TensorInfo:
        try:
            return self._tensors[key]
        except KeyError:
            raise CheckpointError(f"{self.role} checkpoint {self.folder}: key {key!r} not found") from None

    def shape(self, key: str) -> tuple[int, ...]:
        return self.info(key).shape

    def get(self, key: str) -> torch.Tensor:
        return read_tensor(self.info(key), key)


ARCH_FIELDS = ("architectures", "model_type", "hidden_size", "num_hidden_layers", "intermediate_size",
               "num_attention_heads", "num_key_value_heads")


def check_same_architecture(base: Checkpoint, aligned: Checkpoint) -> None:
    """Refuse base/aligned pairs whose config.json disagree on the architecture (shapes are checked per key)."""
    if base.config is None or aligned.config is None:
        return
    for field in ARCH_FIELDS:
        b, a = base.config.get(field), aligned.config.get(field)
        if b is not None and a is not None and b != a:
            raise CheckpointError(
                f"base {base.folder / 'config.json'} and aligned {aligned.folder / 'config.json'} are different "
                f"architectures: {field} is {b!r} vs {a!r}")
