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
    "BOOL": torch.bool, "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
# dtypes the official format knows but torch cannot hold here: a clear "unsupported", not "unknown"
_OTHER_DTYPES = {"F8_E8M0", "F6_E2M3", "F6_E3M2", "F4", "C64"}
_HEADER_LIMIT = 100_000_000  # the official reader's limit


@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    begin: int  # absolute byte offset in the file
    end: int


def _is_count(x) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _parse_entry(path: Path, name: str, info) -> tuple[torch.dtype, tuple[int, ...], int, int]:
    """One header entry, checked as the official reader does: ``(dtype, shape, begin, end)`` (data-relative)."""
    where = f"{path}: tensor {name!r}"
    if not isinstance(info, dict):
        raise CheckpointError(f"{where}: its header entry is not an object")
    missing = [k for k in ("dtype", "shape", "data_offsets") if k not in info]
    if missing:
        raise CheckpointError(f"{where}: header entry lacks {missing}")
    dtype = info["dtype"]
    if dtype not in _DTYPES:
        what = "unsupported" if dtype in _OTHER_DTYPES else "unknown"
        raise CheckpointError(f"{where}: {what} dtype {dtype!r}")
    shape, offsets = info["shape"], info["data_offsets"]
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise CheckpointError(f"{where}: shape {shape!r} is not a list of non-negative integers")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_count(o) for o in offsets)):
        raise CheckpointError(f"{where}: data_offsets {offsets!r} is not a pair of non-negative integers")
    begin, end = offsets
    if end < begin:
        raise CheckpointError(f"{where}: data_offsets {offsets} end before they begin")
    numel = 1
    for d in shape:
        numel *= d
    if numel * _DTYPES[dtype].itemsize != end - begin:
        raise CheckpointError(f"{where}: {end - begin} bytes for shape {shape} of {dtype} "
                              f"(needs {numel * _DTYPES[dtype].itemsize})")
    return _DTYPES[dtype], tuple(shape), begin, end


def read_safetensors_header(path: Path) -> tuple[dict[str, TensorInfo], dict[str, str]]:
    """Parse a safetensors header: ``({name: TensorInfo}, metadata)``; errors name the file (and tensor).

    Accepts what the official reader accepts: a JSON object header (at most 100 MB), every
    entry an object with a known dtype, a shape of non-negative integers and a ``[begin, end]`` pair whose size is
    shape x itemsize; sorted by offset, the tensors tile the data section exactly (no gap, no overlap, no bytes
    after the last one)."""
    path = Path(path)
    try:
        if not path.is_file():
            raise CheckpointError(f"{path}: " + ("not a regular file" if path.exists() else "file not found"))
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                raise CheckpointError(f"{path}: not a safetensors file (shorter than 8 bytes)")
            (n,) = struct.unpack("<Q", raw)
            size = os.fstat(f.fileno()).st_size
            if n > _HEADER_LIMIT or 8 + n > size:
                raise CheckpointError(f"{path}: not a safetensors file (header length {n} is implausible for a "
                                      f"file of {size} bytes)")
            header = f.read(n)
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    try:
        meta = json.loads(header.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object: {exc})") from None
    if not isinstance(meta, dict):
        raise CheckpointError(f"{path}: not a safetensors file (header is not a JSON object)")
    metadata = meta.pop("__metadata__", None) or {}
    if not isinstance(metadata, dict) or not all(isinstance(v, str) for v in metadata.values()):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings")
    entries = sorted(((_parse_entry(path, name, info), name) for name, info in meta.items()),
                     key=lambda e: (e[0][2], e[0][3]))
    start, data_start = 0, 8 + n
    out = {}
    for (dtype, shape, b, e), name in entries:
        if b != start:
            why = "overlaps the tensor before it" if b < start else f"leaves a gap of {b - start} bytes before it"
            raise CheckpointError(f"{path}: tensor {name!r} at data_offsets [{b}, {e}] {why}")
        start = e
        out[name] = TensorInfo(path, dtype, shape, data_start + b, data_start + e)
    if data_start + start != size:
        what = "runs past the end of the file (truncated?)" if data_start + start > size else (
            f"ends {size - data_start - start} bytes before the end of the file")
        raise CheckpointError(f"{path}: the tensor data {what}")
    return out, metadata


def check_finite(t: torch.Tensor, where: str) -> None:
    """Refuse NaN/Inf: Safe LoRA on non-finite weights would write NaN adapters without a word."""
    if not t.is_floating_point() or t.numel() == 0:
        return
    if t.dtype not in (torch.float16, torch.bfloat16, torch.float32, torch.float64):
        t = t.float()  # float8: no sum kernel
    # one fast pass: a NaN or Inf anywhere makes the sum non-finite; only then (or if a finite sum overflowed)
    # the exact element-wise test runs
    if not bool(torch.isfinite(t.sum())) and not bool(torch.isfinite(t).all()):
        n = int((~torch.isfinite(t)).sum())
        raise CheckpointError(f"{where} holds {n} non-finite value(s) (NaN or Inf) of {t.numel()}")


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


def read_json_object(path: Path) -> dict:
    """A JSON file that must hold an object; errors name the file."""
    if not Path(path).is_file():  # a FIFO would block the read forever
        raise CheckpointError(f"{path}: " + ("not a regular file" if Path(path).exists() else "file not found"))
    try:
        obj = json.loads(Path(path).read_bytes().decode("utf-8"))
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot be read: {exc.strerror or exc}") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise CheckpointError(f"{path}: invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path}: must hold a JSON object, not {type(obj).__name__}")
    return obj


def read_weight_map(index: Path) -> dict[str, str]:
    """``weight_map`` of a sharded checkpoint's index: tensor name -> shard file name inside the index's folder."""
    weight_map = read_json_object(index).get("weight_map")
    if not isinstance(weight_map, dict):
        raise CheckpointError(f"{index}: not a safetensors index (needs a 'weight_map' object)")
    for key, shard in weight_map.items():
        if not isinstance(shard, str) or not shard:
            raise CheckpointError(f"{index}: weight_map[{key!r}] must be a shard file name, not {shard!r}")
        parts = Path(shard).parts
        if Path(shard).is_absolute() or ".." in parts or "\\" in shard:
            raise CheckpointError(f"{index}: weight_map[{key!r}] = {shard!r} must name a file inside "
                                  f"{index.parent} (no '..', no absolute path)")
    return weight_map


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
            weight_map = read_weight_map(index)
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
        return read_json_object(p)

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
