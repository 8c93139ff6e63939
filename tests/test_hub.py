"""Hub ids where folders are accepted: resolved through a huggingface_hub cache laid out here (no network:
HF_HUB_OFFLINE=1 in every test), and adapters written by `safeshape train` that load from any directory."""
import json
import os

import pytest
from safetensors.torch import load_file

from safeshape import cli, hub, testing
from safeshape.errors import SafeshapeError


@pytest.fixture
def cache(tmp_path, monkeypatch):
    """An empty hub cache, offline. huggingface_hub reads its constants at import, so patch them too."""
    from huggingface_hub import constants

    root = tmp_path / "hub-cache"
    root.mkdir()
    for name, value in (("HF_HUB_OFFLINE", "1"), ("HF_HUB_CACHE", str(root)), ("TRANSFORMERS_OFFLINE", "1")):
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(root))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    return root


@pytest.fixture(scope="module")
def tiny_model(tmp_path_factory):
    return testing.save_tiny_model(tmp_path_factory.mktemp("hub") / "model", hidden_size=32, vocab_size=320)


def test_folder_is_used_as_given(tmp_path, cache):
    assert hub.resolve_folder(str(tmp_path), "--x") == str(tmp_path)


def test_hub_id_resolves_to_the_cached_snapshot(tmp_path, cache):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    (src / "sub").mkdir()
    (src / "sub" / "tokenizer.json").write_text("{}")
    snap = testing.hub_cache_layout(cache, "org/name", src)
    assert os.path.samefile(hub.resolve_folder("org/name", "--base"), snap)
    assert (snap / "sub" / "tokenizer.json").is_symlink()
    # a tag and a commit hash
    other = testing.hub_cache_layout(cache, "org/name", src, revision="v1", commit="f" * 40)
    assert os.path.samefile(hub.resolve_folder("org/name@v1", "--base"), other)
    assert os.path.samefile(hub.resolve_folder("org/name@" + "f" * 40, "--base"), other)


@pytest.mark.parametrize("name,message", [
    ("org/absent", "not in the Hugging Face cache .* HF_HUB_OFFLINE"),
    ("./no/such/dir", "no such folder, and not a Hugging Face hub id"),
    ("a/b/c", "no such folder, and not a Hugging Face hub id"),
])
def test_unresolvable_names_are_clear_errors(cache, name, message):
    with pytest.raises(SafeshapeError, match=f"--base {name}: .*{message}"):
        hub.resolve_folder(name, "--base")


def test_a_file_is_not_a_folder(tmp_path, cache):
    f = tmp_path / "f.txt"
    f.write_text("x")
    with pytest.raises(SafeshapeError, match="not a folder"):
        hub.resolve_folder(str(f), "--adapter")


def test_offline_flag_is_read_at_call_time(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.hub_offline()
    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    assert not hub.hub_offline()


def test_project_accepts_hub_ids(tmp_path, cache, capsys):
    from safeshape.safelora.example import make_example

    ex = make_example(tmp_path / "ex", hidden=32, intermediate=64, layers=2, heads=4, kv_heads=2, vocab=64, r=2,
                      progress=False)
    for part in ("base", "aligned", "adapter"):
        testing.hub_cache_layout(cache, f"org/{part}", ex / part)
    by_folder, by_id = tmp_path / "by-folder", tmp_path / "by-id"
    assert cli.main(["project", "--base", str(ex / "base"), "--aligned", str(ex / "aligned"), "--adapter",
                     str(ex / "adapter"), "--out", str(by_folder), "--quiet"]) == 0
    capsys.readouterr()
    assert cli.main(["project", "--base", "org/base", "--aligned", "org/aligned", "--adapter", "org/adapter",
                     "--out", str(by_id), "--no-progress", "--json"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and json.loads(out[0])["settings"]["base"] == hub.resolve_folder("org/base", "--base")
    a, b = load_file(by_folder / "adapter_model.safetensors"), load_file(by_id / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all((a[k] == b[k]).all() for k in a)
    assert not any(p.is_symlink() for p in by_id.iterdir())  # the output holds copies, not links into the cache
    capsys.readouterr()


def test_load_guard_accepts_a_hub_id(tmp_path, cache):
    from safeshape.star import load_guard
    from safeshape.star.tiny import save_tiny_guard

    save_tiny_guard(tmp_path / "guard")
    testing.hub_cache_layout(cache, "org/tiny-guard", tmp_path / "guard")
    model, tokenizer = load_guard("org/tiny-guard")
    assert tokenizer.chat_template and not model.training


def _train(tmp_path, model: str, out: str) -> None:
    data = testing.write_tiny_dataset(tmp_path / "sft.jsonl", 4, "sft", seed=3)
    assert cli.main(["train", "--model", model, "--data", str(data), "--out", out, "--loss", "sft", "--max-steps",
                     "1", "--batch-size", "4", "--lora-r", "2", "--max-len", "64", "--no-progress",
                     "--device", "cpu"]) == 0


def _load_elsewhere(adapter, cwd, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    monkeypatch.chdir(cwd)
    return AutoPeftModelForCausalLM.from_pretrained(str(adapter))


def test_train_records_an_absolute_base_for_a_relative_folder(tmp_path, tiny_model, cache, monkeypatch, capsys):
    work = tmp_path / "work"
    work.mkdir()
    os.symlink(tiny_model, work / "model")
    monkeypatch.chdir(work)
    _train(tmp_path, "model", str(tmp_path / "out"))  # relative --model, as typed on a command line
    assert "trained 1 steps, world size 1 (global batch 4)" in capsys.readouterr().out  # the summary line
    recorded = json.loads((tmp_path / "out" / "adapter_config.json").read_text())["base_model_name_or_path"]
    assert os.path.isabs(recorded) and os.path.samefile(recorded, tiny_model)
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    model = _load_elsewhere(tmp_path / "out", elsewhere, monkeypatch)
    assert any("lora_A" in n for n, _ in model.named_parameters())
    capsys.readouterr()


def test_train_from_a_hub_id_records_the_hub_id(tmp_path, tiny_model, cache, monkeypatch, capsys):
    testing.hub_cache_layout(cache, "org/tiny-chat", tiny_model)
    _train(tmp_path, "org/tiny-chat", str(tmp_path / "out"))
    config = json.loads((tmp_path / "out" / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "org/tiny-chat"
    model = _load_elsewhere(tmp_path / "out", tmp_path, monkeypatch)  # PEFT finds the base in the cache
    assert any("lora_A" in n for n, _ in model.named_parameters())
    capsys.readouterr()
