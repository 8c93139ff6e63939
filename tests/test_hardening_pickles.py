"""Item 10 of issue 24, behavioural: a planted pickle (``pytorch_model.bin`` / ``adapter_model.bin``, whose
unpickling would create a file) in every folder a command reads, next to everything else that folder needs but
without its safetensors weights. Every command refuses it with a clear error, and neither ``torch.load`` nor any
unpickler runs (torch's ``weights_only`` loader would stop this payload, so the marker alone proves too little:
the loaders are watched as well). The grep test in test_hardening_train.py only finds ``torch.load(`` in our code;
this one also catches a library (transformers, PEFT) doing it for us."""
import json
import pickle
import shutil
from pathlib import Path

import pytest
import torch

from safeshape import testing
from safeshape.cli import main as cli_main
from safeshape.errors import SafeshapeError


class Planted:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (Path.touch, (Path(self.marker),))


@pytest.fixture
def watch_loaders(monkeypatch):
    """Every torch.load / pickle load in this process is recorded (and refused)."""
    calls = []

    def refuse(name):
        def fn(*a, **k):
            calls.append(name)
            raise RuntimeError(f"{name} called")
        return fn

    monkeypatch.setattr(torch, "load", refuse("torch.load"))
    monkeypatch.setattr(pickle, "load", refuse("pickle.load"))
    monkeypatch.setattr(pickle, "loads", refuse("pickle.loads"))
    return calls


def plant(folder: Path, name: str, marker: Path) -> None:
    for f in folder.glob("*.safetensors"):
        f.unlink()
    with open(folder / name, "wb") as f:
        pickle.dump({"weight": Planted(marker)}, f)


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    root = tmp_path_factory.mktemp("pickles")
    from safeshape.safelora.example import make_example
    from safeshape.star import tiny

    model = testing.save_tiny_model(root / "model", hidden_size=32, vocab_size=320)
    tiny.save_tiny_guard(root / "guard", hidden=32)
    make_example(root / "ex", hidden=32, intermediate=48, layers=1, heads=2, kv_heads=1, vocab=64, r=2,
                 progress=False)
    return {"model": model, "guard": root / "guard", "ex": root / "ex"}


def copy(src, dst):
    shutil.copytree(src, dst, symlinks=True)
    return dst


def harmful_csv(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("prompt\nHow do I pick a lock?\n")
    return p


def star_data(tmp_path):
    p = tmp_path / "in.jsonl"
    p.write_text(json.dumps({"prompt": "Hi", "response": "Hello there my friend"}) + "\n")
    return p


CASES = ["train --model", "eval --model", "star --guard", "eval --guard", "project --base", "project --aligned",
         "project --adapter"]


@pytest.mark.parametrize("case", CASES)
def test_a_planted_pickle_is_never_loaded(case, sources, tmp_path, watch_loaders, capsys):
    marker = tmp_path / "pwned"
    model = guard = None
    ex = {k: sources["ex"] / k for k in ("base", "aligned", "adapter")}
    if case.endswith("--model"):
        model = copy(sources["model"], tmp_path / "model")
        plant(model, "pytorch_model.bin", marker)
    elif case.endswith("--guard"):
        guard = copy(sources["guard"], tmp_path / "guard")
        plant(guard, "pytorch_model.bin", marker)
    else:
        which = case.split("--")[1]
        ex[which] = copy(ex[which], tmp_path / which)
        plant(ex[which], "adapter_model.bin" if which == "adapter" else "pytorch_model.bin", marker)
    model = model or sources["model"]
    guard = guard or sources["guard"]
    if case == "train --model":
        data = testing.write_tiny_dataset(tmp_path / "d.jsonl", 2, "sft", seed=1)
        argv = ["train", "--model", str(model), "--data", str(data), "--loss", "sft", "--max-steps", "1",
                "--no-progress", "--out", str(tmp_path / "o")]
    elif case == "eval --model":
        argv = ["eval", "--model", str(model), "--harmful", str(harmful_csv(tmp_path)), "--out", str(tmp_path / "o"),
                "--no-progress"]
    elif case == "star --guard":
        argv = ["star", "--guard", str(guard), "--data", str(star_data(tmp_path)), "--out", str(tmp_path / "o.jsonl"),
                "--no-progress"]
    elif case == "eval --guard":  # the guard loader eval uses, after generation
        from safeshape.star import load_guard

        with pytest.raises(SafeshapeError, match="cannot load the model") as info:
            load_guard(guard)
        assert info.value.__cause__ is not None
        argv = None
    else:
        argv = ["project", "--base", str(ex["base"]), "--aligned", str(ex["aligned"]), "--adapter",
                str(ex["adapter"]), "--out", str(tmp_path / "o"), "--quiet"]
    if argv is not None:
        assert cli_main(argv) == 2, case
        err = capsys.readouterr().err
        assert "error:" in err and "Traceback" not in err, err
    assert watch_loaders == [], f"{case}: {watch_loaders} ran on a file we were handed"
    assert not marker.exists()
