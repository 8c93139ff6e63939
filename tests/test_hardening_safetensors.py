"""Our streaming safetensors reader accepts exactly what the official `safetensors` package accepts (on crafted
files), with errors naming the file and tensor; sharded indexes cannot point outside their folder."""
import json
import os
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from safeshape.errors import CheckpointError
from safeshape.safelora.checkpoint import Checkpoint, read_safetensors_header, read_tensor
from tests.hardening_common import deadline


def craft(path, header, data: bytes, raw_header: bytes | None = None):
    h = raw_header if raw_header is not None else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)
    return path


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": list(shape), "data_offsets": list(offsets)}


D16 = bytes(range(16))
CASES = {
    # name: (header dict or raw bytes, data)
    "ok_two": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(8, 16))}, D16),
    "ok_out_of_order": ({"b": entry(offsets=(8, 16)), "a": entry(offsets=(0, 8))}, D16),
    "ok_empty_tensor": ({"a": entry(shape=(0, 3), offsets=(0, 0)), "b": entry(shape=(4,), offsets=(0, 16))}, D16),
    "ok_metadata": ({"__metadata__": {"format": "pt"}, "a": entry(shape=(4,), offsets=(0, 16))}, D16),
    "ok_scalar": ({"a": entry(shape=(), offsets=(0, 4))}, D16[:4]),
    "ok_padded_header": (b'{"a":{"dtype":"F32","shape":[4],"data_offsets":[0,16]}}    ', D16),
    "overlap": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(4, 12))}, D16[:12]),
    "gap": ({"a": entry(offsets=(0, 8)), "b": entry(offsets=(12, 20))}, D16 + D16[:4]),
    "not_from_zero": ({"a": entry(offsets=(8, 16))}, D16),
    "begin_after_end": ({"a": entry(shape=(0,), offsets=(8, 0))}, D16[:8]),
    "offsets_not_int": ({"a": entry(offsets=(0.0, 8.0))}, D16[:8]),
    "offsets_triple": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8, 8]}}, D16[:8]),
    "offsets_negative": ({"a": entry(shape=(0,), offsets=(-8, -8))}, b""),
    "offsets_string": ({"a": {"dtype": "F32", "shape": [2], "data_offsets": "0,8"}}, D16[:8]),
    "header_list": (b'[{"dtype":"F32","shape":[2],"data_offsets":[0,8]}]', D16[:8]),
    "entry_not_object": ({"a": [1, 2]}, D16[:8]),
    "entry_missing_field": ({"a": {"dtype": "F32", "shape": [2]}}, D16[:8]),
    "shape_negative": ({"a": entry(shape=(-2,), offsets=(0, 8))}, D16[:8]),
    "shape_float": ({"a": entry(shape=(2.0,), offsets=(0, 8))}, D16[:8]),
    "shape_bool": ({"a": entry(shape=(True, 2), offsets=(0, 8))}, D16[:8]),
    "unknown_dtype": ({"a": entry(dtype="F33", offsets=(0, 8))}, D16[:8]),
    "size_mismatch": ({"a": entry(shape=(3,), offsets=(0, 8))}, D16[:8]),
    "trailing_bytes": ({"a": entry(offsets=(0, 8))}, D16),
    "truncated": ({"a": entry(shape=(4,), offsets=(0, 16))}, D16[:8]),
    "metadata_not_strings": ({"__metadata__": {"n": 1}, "a": entry(offsets=(0, 8))}, D16[:8]),
    "header_not_json": (b'{"a": nope}', D16[:8]),
    "ok_header_space_first": (b' {"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D16[:8]),
    "header_longer_than_file": (None, b""),
    "header_not_utf8": (b'{"\xff":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}', D16[:8]),
}


def official_accepts(path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for k in f.keys():
                f.get_tensor(k)
        return True
    except Exception:
        return False


@pytest.mark.parametrize("name", sorted(CASES))
def test_reader_agrees_with_official_safetensors(tmp_path, name):
    header, data = CASES[name]
    path = tmp_path / f"{name}.safetensors"
    if name == "header_longer_than_file":
        path.write_bytes(struct.pack("<Q", 1000) + b"{}")
    elif isinstance(header, bytes):
        craft(path, None, data, raw_header=header)
    else:
        craft(path, header, data)
    official = official_accepts(path)
    assert official == name.startswith("ok_"), f"the crafted case {name} is not what its name says"
    if official:
        infos, _ = read_safetensors_header(path)
        with safe_open(str(path), "pt") as f:
            assert sorted(infos) == sorted(f.keys())
            for k, info in infos.items():
                torch.testing.assert_close(read_tensor(info, k), f.get_tensor(k), rtol=0, atol=0)
    else:
        with pytest.raises(CheckpointError, match=str(path)):
            infos, _ = read_safetensors_header(path)
            for k, info in infos.items():
                read_tensor(info, k)


def test_error_names_the_tensor(tmp_path):
    path = craft(tmp_path / "x.safetensors", {"a": entry(offsets=(0, 8)), "wq": entry(offsets=(4, 12))}, D16[:12])
    with pytest.raises(CheckpointError, match="tensor 'wq'.*overlaps"):
        read_safetensors_header(path)


def test_special_file_is_not_read(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    with deadline(20), pytest.raises(CheckpointError, match="not a regular file"):
        read_safetensors_header(fifo)  # opening a FIFO would block forever


def test_special_config_json_is_not_read(tmp_path):
    folder = tmp_path / "ck"
    folder.mkdir()
    save_file({"w": torch.zeros(2)}, str(folder / "model.safetensors"))
    os.mkfifo(folder / "config.json")
    with deadline(20), pytest.raises(CheckpointError, match="config.json: not a regular file"):
        Checkpoint(folder)


def _sharded(tmp_path, weight_map):
    folder = tmp_path / "ck"
    folder.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(folder / "s1.safetensors"))
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    return folder


@pytest.mark.parametrize("weight_map, match", [
    ([["w", "s1.safetensors"]], "'weight_map' object"),
    ({"w": 5}, "must be a shard file name"),
    ({"w": "../outside.safetensors"}, "no '..'"),
    ({"w": "/etc/outside.safetensors"}, "no '..', no absolute path"),
])
def test_index_errors(tmp_path, weight_map, match):
    outside = tmp_path / "outside.safetensors"
    save_file({"w": torch.zeros(2)}, str(outside))  # a readable file the bad names could reach
    with pytest.raises(CheckpointError, match=match):
        Checkpoint(_sharded(tmp_path, weight_map))


def test_index_not_an_object(tmp_path):
    folder = _sharded(tmp_path, {"w": "s1.safetensors"})
    (folder / "model.safetensors.index.json").write_text("[1, 2]")
    with pytest.raises(CheckpointError, match="must hold a JSON object"):
        Checkpoint(folder)
    assert Checkpoint(_sharded(tmp_path / "ok", {"w": "s1.safetensors"})).get("w").shape == (2,)
