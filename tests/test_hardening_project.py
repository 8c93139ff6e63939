"""`safeshape project` / apply_safe_lora on hostile or broken inputs: a clear error naming the file and tensor
(no traceback from the CLI, nothing written, inputs untouched), or a correct result."""
import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from safeshape.cli import main as cli_main
from safeshape.errors import CheckpointError
from safeshape.safelora import Adapter, apply_safe_lora, project_adapter
from safeshape.safelora.example import make_example
from tests.hardening_common import deadline

SMALL = dict(hidden=32, intermediate=48, layers=1, heads=2, kv_heads=1, vocab=64, r=2)
KEY_B = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
KEY_A = KEY_B.replace("lora_B", "lora_A")
WKEY = "model.layers.0.self_attn.q_proj.weight"


@pytest.fixture(scope="module")
def example(tmp_path_factory):
    root = tmp_path_factory.mktemp("hx") / "ex"
    make_example(root, **SMALL, progress=False)
    return root


@pytest.fixture
def ex(example, tmp_path):
    dst = tmp_path / "ex"
    shutil.copytree(example, dst)
    return dst


def tree(folder: Path) -> dict:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def run_cli(ex, out, *extra):
    return cli_main(["project", "--base", str(ex / "base"), "--aligned", str(ex / "aligned"), "--adapter",
                     str(ex / "adapter"), "--out", str(out), "--quiet", *map(str, extra)])


def expect_cli_error(capsys, ex, out, match, *extra):
    before = {k: tree(ex / k) for k in ("base", "aligned", "adapter")}
    rc = run_cli(ex, out, *extra)
    err = capsys.readouterr().err
    assert rc == 2, err
    assert "Traceback" not in err and "error:" in err
    assert re.search(match, err), err
    assert not out.exists()
    assert not [p for p in out.parent.iterdir() if p.name.startswith(f".{out.name}.")]
    assert before == {k: tree(ex / k) for k in ("base", "aligned", "adapter")}  # inputs untouched
    return err


def _edit_safetensors(path: Path, key: str, fn):
    t = load_file(path)
    t[key] = fn(t[key].clone())
    save_file(t, str(path), metadata={"format": "pt"})


def _weights_file(folder: Path, key: str) -> Path:
    single = folder / "model.safetensors"
    if single.exists():
        return single
    return folder / json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"][key]


# ---- item 3: non-finite values ----

@pytest.mark.parametrize("where, value", [("base", float("nan")), ("aligned", float("inf")),
                                          ("lora_A", float("nan")), ("lora_B", float("-inf"))])
def test_non_finite_values_are_named(ex, tmp_path, capsys, where, value):
    if where in ("base", "aligned"):
        path, key = _weights_file(ex / where, WKEY), WKEY
    else:
        path, key = ex / "adapter" / "adapter_model.safetensors", KEY_A if where == "lora_A" else KEY_B
    _edit_safetensors(path, key, lambda t: t.view(-1).index_fill_(0, torch.tensor([3]), value).view(t.shape))
    expect_cli_error(capsys, ex, tmp_path / "out", rf"{path}.*tensor '{key}'.*non-finite")


def test_apply_safe_lora_refuses_non_finite(tmp_path):
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=32, intermediate_size=48, num_hidden_layers=1, num_attention_heads=2,
                                   num_key_value_heads=1, vocab_size=64)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    aligned = transformers.LlamaForCausalLM(cfg)
    with torch.no_grad():
        for (_, p), (_, q) in zip(aligned.named_parameters(), base.named_parameters()):
            p.copy_(q + 0.01 * torch.randn_like(q))
    aligned.save_pretrained(tmp_path / "aligned")
    model = peft.get_peft_model(aligned, peft.LoraConfig(r=2, lora_alpha=4, target_modules=["q_proj"]))
    lora_b = next(p for n, p in model.named_parameters() if "lora_B" in n)
    with torch.no_grad():
        lora_b.normal_()
        lora_b[0, 0] = float("nan")
    with pytest.raises(CheckpointError, match=r"q_proj: lora_B\['default'\].*non-finite"):
        apply_safe_lora(model, tmp_path / "base", tmp_path / "aligned", progress=False)
    assert torch.isnan(lora_b[0, 0])  # nothing was changed
    with torch.no_grad():
        lora_b[0, 0] = 0.0
    apply_safe_lora(model, tmp_path / "base", tmp_path / "aligned", progress=False)  # and fine once finite
    assert bool(torch.isfinite(lora_b).all())


# ---- item 4: V = 0 ----

def test_identical_base_and_aligned_refused_unless_allowed(ex, tmp_path, capsys):
    shutil.rmtree(ex / "aligned")
    shutil.copytree(ex / "base", ex / "aligned")
    err = expect_cli_error(capsys, ex, tmp_path / "out",
                           r"base == aligned weights.*model\.layers\.0\.self_attn\.q_proj")
    assert "--allow-zero-alignment" in err
    assert run_cli(ex, tmp_path / "out", "--allow-zero-alignment") == 0
    rep = json.loads((tmp_path / "out" / "safelora_report.json").read_text())
    assert any("||V||_F = 0" in w for w in rep["warnings"])


# ---- item 6: adapter_config.json ----

@pytest.mark.parametrize("edit, match", [
    (lambda c: [1, 2], "must hold a JSON object"),
    (lambda c: {**c, "lora_alpha": "sixteen"}, "lora_alpha must be a number"),
    (lambda c: {**c, "target_modules": 5}, "target_modules must be a list"),
    (lambda c: {**c, "rank_pattern": ["q_proj", 4]}, "rank_pattern must be an object"),
    (lambda c: {**c, "rank_pattern": {"q_proj": "four"}}, r"rank_pattern\['q_proj'\] must be"),
    (lambda c: {**c, "target_modules": "(q_proj"}, "target_modules: .* not a valid regular expression"),
    (lambda c: {**c, "alpha_pattern": {"(": 4}}, "alpha_pattern key: .* not a valid regular expression"),
    (lambda c: {**c, "r": True}, "r must be a positive integer"),
])
def test_adapter_config_errors(ex, tmp_path, capsys, edit, match):
    cfg_path = ex / "adapter" / "adapter_config.json"
    cfg_path.write_text(json.dumps(edit(json.loads(cfg_path.read_text()))))
    expect_cli_error(capsys, ex, tmp_path / "out", f"adapter_config.json: {match}")


# ---- item 9: settings and special files ----

@pytest.mark.parametrize("args, match", [
    (["--select", "threshold", "--threshold", "nan"], "--threshold must be a number in"),
    (["--select", "threshold", "--threshold", "1.5"], "--threshold must be a number in"),
    (["--threshold", "-0.1"], "--threshold must be a number in"),
    (["--num-layers", "0"], "--num-layers must be a positive integer"),
    (["--select", "threshold", "--num-layers", "-3"], "--num-layers must be a positive integer"),
])
def test_bad_selection_settings(ex, tmp_path, capsys, args, match):
    expect_cli_error(capsys, ex, tmp_path / "out", match, *args)


def test_fifo_in_adapter_folder_refused(ex, tmp_path, capsys):
    os.mkfifo(ex / "adapter" / "README.md")  # copying it to the output would block forever
    with deadline(60):
        expect_cli_error(capsys, ex, tmp_path / "out", r"README\.md is not a regular file or folder")


def test_symlink_in_adapter_folder_is_reported(ex, tmp_path, capsys):
    secret = tmp_path / "secret.txt"
    secret.write_text("outside the adapter")
    (ex / "adapter" / "notes.txt").symlink_to(secret)
    assert run_cli(ex, tmp_path / "out") == 0
    assert f"notes.txt is a symlink to {secret}; kept as a link" in capsys.readouterr().err
    assert (tmp_path / "out" / "notes.txt").is_symlink()  # the output never holds a copy of what it points to
    assert os.readlink(tmp_path / "out" / "notes.txt") == str(secret)
    rep = json.loads((tmp_path / "out" / "safelora_report.json").read_text())
    assert any("notes.txt is a symlink" in w for w in rep["warnings"])
    (ex / "adapter" / "notes.txt").unlink()
    (ex / "adapter" / "notes.txt").symlink_to(tmp_path / "missing")
    expect_cli_error(capsys, ex, tmp_path / "out2", "notes.txt is a dangling symlink")


# ---- item 8: outputs that cannot be written ----

def test_report_path_that_cannot_be_written(ex, tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    expect_cli_error(capsys, ex, tmp_path / "out", "afile is not a folder", "--report", tmp_path / "afile" / "r.json")
    # a report that fails only when written (here: a folder in its place) still leaves no OUT
    (tmp_path / "r.json").mkdir()
    expect_cli_error(capsys, ex, tmp_path / "out", r"--report .*r\.json", "--report", tmp_path / "r.json",
                     "--overwrite")


def test_report_inside_out(ex, tmp_path):
    out = tmp_path / "out"
    project_adapter(ex / "base", ex / "aligned", ex / "adapter", out, report=out / "sub" / "rep.json",
                    progress=False)
    assert json.loads((out / "sub" / "rep.json").read_text())["totals"]["num_modules"] > 0


def test_full_disk_leaves_nothing(ex, tmp_path, capsys, monkeypatch):
    import safetensors.torch

    def full(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full)
    expect_cli_error(capsys, ex, tmp_path / "out", "No space left on device")
    # and an existing OUT is kept as it was when replacing it fails
    monkeypatch.undo()
    assert run_cli(ex, tmp_path / "out") == 0
    before = tree(tmp_path / "out")
    monkeypatch.setattr(safetensors.torch, "save_file", full)
    assert run_cli(ex, tmp_path / "out", "--overwrite") == 2
    assert tree(tmp_path / "out") == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only folders")
def test_read_only_parent(ex, tmp_path, capsys):
    ro = tmp_path / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    try:
        expect_cli_error(capsys, ex, ro / "out", "not writable")
    finally:
        ro.chmod(0o755)


def test_read_only_parent_simulated(ex, tmp_path, capsys, monkeypatch):
    import tempfile

    def denied(*a, **k):
        raise PermissionError(errno.EACCES, os.strerror(errno.EACCES))

    monkeypatch.setattr(tempfile, "mkdtemp", denied)
    expect_cli_error(capsys, ex, tmp_path / "out", "cannot create it: Permission denied")


# ---- item 5 through the CLI: a crafted weights file gives a message, not a traceback ----

def test_crafted_adapter_weights_through_cli(ex, tmp_path, capsys):
    import struct

    path = ex / "adapter" / "adapter_model.safetensors"
    header = json.dumps({KEY_A: {"dtype": "F32", "shape": [2, 32], "data_offsets": [0, 256]},
                         KEY_B: {"dtype": "F32", "shape": [32, 2], "data_offsets": [128, 384]}}).encode()
    path.write_bytes(struct.pack("<Q", len(header)) + header + bytes(384))
    expect_cli_error(capsys, ex, tmp_path / "out", rf"{path}: tensor '{KEY_B}'.*overlaps")


# ---- item 13: the umask ----

@pytest.mark.parametrize("mask, dir_mode, file_mode", [(0o022, 0o755, 0o644), (0o077, 0o700, 0o600)])
def test_outputs_respect_umask(ex, tmp_path, mask, dir_mode, file_mode):
    old = os.umask(mask)
    try:
        out = tmp_path / "out"
        project_adapter(ex / "base", ex / "aligned", ex / "adapter", out, report=tmp_path / "rep.json",
                        progress=False)
    finally:
        os.umask(old)
    assert out.stat().st_mode & 0o777 == dir_mode
    assert (tmp_path / "rep.json").stat().st_mode & 0o777 == file_mode
    assert (out / "adapter_model.safetensors").stat().st_mode & 0o777 == file_mode


def test_adapter_class_reports_folder_warnings(ex):
    assert Adapter(ex / "adapter").warnings == []
