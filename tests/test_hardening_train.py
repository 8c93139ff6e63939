"""`safeshape train` hardening: no pickle ever loaded from a checkpoint, state stored as safetensors + JSON,
invalid UTF-8 named by line, --max-len effects reported, final adapter installed config-last, umask respected."""
import json
import os
import pickle
import re
from pathlib import Path

import numpy as np
import pytest
import torch

from safeshape import testing
from safeshape.cli import main as cli_main
from safeshape.errors import SafeshapeError
from safeshape.trainer import TrainConfig, train
from safeshape.trainer import checkpoint as ckpt_io

import safeshape

PACKAGE = Path(safeshape.__file__).resolve().parent


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("htrain")
    model = testing.save_tiny_model(root / "model", hidden_size=32, vocab_size=320)
    return {"root": root, "model": str(model),
            "sft": str(testing.write_tiny_dataset(root / "sft.jsonl", 6, "sft", seed=7))}


def _config(files, out, **kw):
    base = dict(model=files["model"], data=files["sft"], out=str(out), loss="sft", lr=5e-3, batch_size=2,
                lora_r=4, max_len=128, progress=False, seed=1, max_steps=2)
    base.update(kw)
    return TrainConfig(**base)


class Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


def test_planted_pickle_checkpoint_is_never_loaded(files, tmp_path):
    out = tmp_path / "o"
    train(_config(files, out))
    ck = out / "checkpoint-2"
    for name in (ckpt_io.STATE_TENSORS, ckpt_io.STATE_OBJECTS, "trainer_state.pt"):
        if (ck / name).exists():
            (ck / name).unlink()
    marker = tmp_path / "pwned"
    with open(ck / "trainer_state.pt", "wb") as f:
        pickle.dump({"step": Planted(marker)}, f)
    with pytest.raises(SafeshapeError, match=r"trainer_state\.pt is a pickle .* never loaded"):
        train(_config(files, out, resume=True))
    assert not marker.exists()


def test_pickled_model_weights_are_refused(files, tmp_path):
    import shutil

    model = tmp_path / "model"
    shutil.copytree(files["model"], model)
    (model / "model.safetensors").unlink()
    marker = tmp_path / "pwned"
    with open(model / "pytorch_model.bin", "wb") as f:
        pickle.dump({"w": Planted(marker)}, f)
    with pytest.raises(SafeshapeError, match="cannot load the model"):
        train(_config(files, tmp_path / "o", model=str(model)))
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["objects", "tensors", "dtype"])
def test_damaged_trainer_state_is_a_clear_error(files, tmp_path, damage):
    out = tmp_path / "o"
    train(_config(files, out, max_steps=1))
    ck = out / "checkpoint-1"
    if damage == "objects":
        (ck / ckpt_io.STATE_OBJECTS).write_text('{"__dict__": [[["unhashable"], 1]]}')
    elif damage == "tensors":
        (ck / ckpt_io.STATE_TENSORS).write_bytes(b"garbage")
    else:
        text = (ck / ckpt_io.STATE_OBJECTS).read_text().replace('"dtype": "uint32"', '"dtype": "object"')
        (ck / ckpt_io.STATE_OBJECTS).write_text(text)
    with pytest.raises(SafeshapeError, match=str(ck)):
        train(_config(files, out, max_steps=2, resume=True))


def test_no_pickle_loading_anywhere_in_the_package():
    """No file is ever unpickled. One exception, pinned here: vllm_support's data-parallel replicas exchange their
    messages over multiprocessing pipes between our own processes (plain pickle, so that torch's shared-memory
    reducers stay out), and only ``pickle.loads(<connection>.recv_bytes())`` is allowed, only in that module."""
    bad = re.compile(r"torch\.load\(|import pickle|from pickle|pickle\.loads?\(|cPickle|dill|joblib\.load")
    pipe = re.compile(r"^\s*import pickle$|pickle\.loads\([\w.\[\]]+\.recv_bytes\(\)\)")
    hits, pipes = [], []
    for p in PACKAGE.rglob("*.py"):
        rel = str(p.relative_to(PACKAGE))
        for i, line in enumerate(p.read_text().splitlines(), 1):
            if bad.search(line):
                ok = rel == "vllm_support.py" and pipe.search(line) and not re.search(r"pickle\.load\(", line)
                (pipes if ok else hits).append(f"{rel}:{i}")
    assert hits == []
    assert len(pipes) <= 3  # the import and the two pipe reads (parent <- replica, replica <- parent)
    # the rule can fail: a file read anywhere, even in that module, is a hit
    for line in ("obj = pickle.load(open(path, 'rb'))", "value = pickle.loads(path.read_bytes())"):
        assert bad.search(line) and not pipe.search(line)


@pytest.mark.parametrize("flag, value", [("--kl-coef", "nan"), ("--max-grad-norm", "inf"), ("--lr", "nan"),
                                         ("--lora-alpha", "nan"), ("--lora-dropout", "1.0"), ("--device", "cuda:7")])
def test_bad_numbers_and_devices_are_clear_errors(files, tmp_path, capsys, flag, value):
    if value.startswith("cuda") and torch.cuda.is_available():
        pytest.skip("a CUDA machine may have that device")
    rc = cli_main(["train", "--model", files["model"], "--data", files["sft"], "--out", str(tmp_path / "o"),
                   "--loss", "sft", "--no-progress", flag, value])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err and flag in err, err
    assert not (tmp_path / "o").exists()


def test_trainer_state_round_trip_is_exact():
    torch.manual_seed(3)
    p = torch.nn.Parameter(torch.randn(5, 3))
    opt = torch.optim.AdamW([p], lr=1e-3)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5)
    p.grad = torch.randn_like(p)
    opt.step()
    sched.step()
    np.random.seed(4)
    np.random.rand()
    state = {"step": 7, "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": [ckpt_io.rng_state()]}
    tensors = {}
    objects = json.loads(json.dumps(ckpt_io.encode_state(state, tensors)))
    back = ckpt_io.decode_state(objects, tensors, "x")
    assert back["step"] == 7 and back["scheduler"] == sched.state_dict()
    assert back["optimizer"]["param_groups"] == opt.state_dict()["param_groups"]
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(back["optimizer"]["state"][0][k], v)
    draws = []
    for st in (state["rng"][0], back["rng"][0]):
        ckpt_io.set_rng_state(st)
        draws.append((torch.rand(3).tolist(), np.random.rand(), __import__("random").random()))
    assert draws[0] == draws[1]
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


def test_checkpoint_holds_no_pickle(files, tmp_path):
    out = tmp_path / "o"
    train(_config(files, out, max_steps=1))
    names = sorted(set(os.listdir(out / "checkpoint-1")) - {"README.md"})  # PEFT's model card
    assert names == ["adapter_config.json", "adapter_model.safetensors", ckpt_io.STATE_JSON, ckpt_io.STATE_TENSORS,
                     ckpt_io.STATE_OBJECTS]


def test_invalid_utf8_names_the_line(files, tmp_path, capsys):
    data = tmp_path / "bad.jsonl"
    good = Path(files["sft"]).read_bytes().splitlines(keepends=True)
    data.write_bytes(good[0] + good[1] + b'{"prompt": "caf\xe9", "response": "x"}\n' + good[2])
    rc = cli_main(["train", "--model", files["model"], "--data", str(data), "--out", str(tmp_path / "o"),
                   "--loss", "sft", "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "Traceback" not in err
    assert f"{data} line 3: not valid UTF-8" in err


def test_max_len_effects_are_reported(files, tmp_path, capsys):
    rows = testing.tiny_rows(5, "sft", seed=2)
    rows[1]["prompt"] = " ".join(["history"] * 200)  # no response token within max_len: dropped
    rows[3]["response"] = " ".join(["long"] * 200)  # cut at the end
    data = tmp_path / "d.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "o"
    summary = train(_config(files, out, data=str(data), max_len=64, max_steps=1))
    err = capsys.readouterr().err
    assert summary["dropped_rows"] == 1 and summary["dropped_lines"] == [2]
    assert summary["truncated_rows"] >= 1
    assert "--max-len 64:" in err and "dropped" in err and "(lines 2)" in err
    saved = json.loads((out / "train_summary.json").read_text())
    assert saved["dropped_lines"] == [2] and saved["truncated_rows"] == summary["truncated_rows"]


def test_final_adapter_config_is_installed_last(files, tmp_path, monkeypatch):
    """A kill between the two renames leaves no adapter_config.json (not an adapter), never config + other
    weights; the rerun with --resume completes it."""
    from safeshape import io

    out = tmp_path / "o"
    real, calls = os.replace, []

    def replace(src, dst):
        calls.append(Path(dst).name)
        if Path(dst).name == "adapter_config.json" and Path(dst).parent == out:
            raise KeyboardInterrupt  # the kill
        return real(src, dst)

    monkeypatch.setattr(io.os, "replace", replace)
    with pytest.raises(KeyboardInterrupt):
        train(_config(files, out))
    monkeypatch.undo()
    assert (out / "adapter_model.safetensors").exists() and not (out / "adapter_config.json").exists()
    train(_config(files, out, resume=True))
    assert (out / "adapter_config.json").exists()
    assert not [p for p in os.listdir(out) if p.startswith(".") and p != io.MANIFEST]


def test_full_disk_during_a_checkpoint(files, tmp_path, monkeypatch):
    import errno

    import peft  # noqa: F401  imported first: it binds safetensors' save_file at import time
    import safetensors.torch

    out = tmp_path / "o"
    real = safetensors.torch.save_file
    calls = []

    def save_file(tensors, path, *a, **k):
        calls.append(path)
        if ".checkpoint-2.tmp-" in str(path):  # the disk fills while the second checkpoint is written
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real(tensors, path, *a, **k)

    monkeypatch.setattr(safetensors.torch, "save_file", save_file)
    with pytest.raises(SafeshapeError, match=r"checkpoint .*checkpoint-2: writing failed.*No space left"):
        train(_config(files, out, save_every=1))
    monkeypatch.undo()
    assert sorted(p for p in os.listdir(out) if "checkpoint" in p) == ["checkpoint-1"]  # no partial checkpoint
    train(_config(files, out, save_every=1, resume=True))  # and the run completes from checkpoint-1
    assert (out / "checkpoint-2").is_dir() and (out / "adapter_config.json").exists()


def test_train_outputs_respect_umask(files, tmp_path):
    old = os.umask(0o022)
    try:
        out = tmp_path / "o"
        train(_config(files, out, max_steps=1))
    finally:
        os.umask(old)
    for rel in ("train_summary.json", "adapter_model.safetensors", "checkpoint-1/trainer_state.json",
                "checkpoint-1/adapter_model.safetensors"):
        assert (out / rel).stat().st_mode & 0o777 == 0o644, rel
    assert (out / "checkpoint-1").stat().st_mode & 0o777 == 0o755
