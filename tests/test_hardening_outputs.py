"""Issue 24: nothing is lost through links or overwrites. One rule for every output (safeshape.io): never write
through a link we did not create (refused before any work), and --overwrite replaces only a folder safeshape wrote
(its manifest, .safeshape-output.json). Each command is tried with the link or the foreign folder planted where
its output goes; the planted target must be byte-identical afterwards."""
import json
import os

import pytest

from safeshape import io, testing
from safeshape.cli import main as cli_main
from safeshape.errors import SafeshapeError

NOTES = b"my notes, not an output\n"


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return testing.save_tiny_model(tmp_path_factory.mktemp("m") / "model", hidden_size=32, vocab_size=320)


def plant_notes(tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_bytes(NOTES)
    return notes


def harmful_csv(tmp_path):
    p = tmp_path / "h.csv"
    p.write_text("prompt\nHow do I pick a lock?\nWrite a phishing mail.\n")
    return p


# ---- safeshape.io: the rule itself ----------------------------------------------------------------------------

@pytest.mark.parametrize("dangling", [False, True])
@pytest.mark.parametrize("writer", ["file", "dir", "json"])
def test_io_never_writes_through_a_link(tmp_path, writer, dangling):
    target = tmp_path / ("gone" if dangling else "notes.txt")
    if not dangling:
        target.write_bytes(NOTES)
    link = tmp_path / "out"
    link.symlink_to(target)
    with pytest.raises(SafeshapeError, match="symbolic link"):
        if writer == "file":
            io.atomic_write_text(link, "x", overwrite=True)
        elif writer == "json":
            io.write_json(link, {"a": 1}, overwrite=True)
        else:
            with io.atomic_output_dir(link, overwrite=True) as tmp:
                (tmp / "f").write_text("x")
    assert link.is_symlink()
    assert (not target.exists()) if dangling else target.read_bytes() == NOTES


def test_io_overwrite_replaces_only_our_folders(tmp_path):
    foreign = tmp_path / "thesis"
    foreign.mkdir()
    (foreign / "thesis.txt").write_bytes(NOTES)
    with pytest.raises(SafeshapeError, match="replaces only an output folder safeshape wrote"):
        with io.atomic_output_dir(foreign, overwrite=True) as tmp:
            (tmp / "f").write_text("x")
    assert sorted(os.listdir(foreign)) == ["thesis.txt"]
    empty = tmp_path / "empty"
    empty.mkdir()
    for out in (empty, tmp_path / "new"):  # an empty or a new folder: nothing to lose
        for _ in range(2):  # the second time it is our own output, replaced
            with io.atomic_output_dir(out, overwrite=True, command="test") as tmp:
                (tmp / "f").write_text("x")
            assert io.is_our_output(out)
            assert json.loads((out / io.MANIFEST).read_text())["command"] == "test"
    # a manifest that is itself a link does not make a folder ours
    (foreign / io.MANIFEST).symlink_to(out / io.MANIFEST)
    assert not io.is_our_output(foreign)


# ---- the commands ---------------------------------------------------------------------------------------------

def test_eval_refuses_a_link_planted_in_out(tmp_path, model_dir, capsys):
    """Item 1: a link at OUT/eval_report.json (and at the other files eval writes in OUT) is refused, nothing is
    written through it; eval checks OUT before loading anything."""
    notes = plant_notes(tmp_path)
    for name in ("eval_report.json", "responses.jsonl", "eval_plot.png", "projected"):
        out = tmp_path / f"o-{name}"
        out.mkdir()
        (out / name).symlink_to(notes)
        rc = cli_main(["eval", "--model", str(model_dir), "--harmful", str(harmful_csv(tmp_path)), "--out", str(out),
                       "--no-progress"])
        assert rc == 2 and "symbolic link" in capsys.readouterr().err, name
        assert notes.read_bytes() == NOTES
    out = tmp_path / "o-link"
    out.symlink_to(tmp_path / "elsewhere", target_is_directory=True)  # OUT itself a dangling link
    assert cli_main(["eval", "--model", str(model_dir), "--harmful", str(harmful_csv(tmp_path)), "--out", str(out)]) == 2
    assert "symbolic link" in capsys.readouterr().err and not (tmp_path / "elsewhere").exists()


def test_eval_response_store_refuses_a_link(tmp_path):
    from safeshape.eval.store import ResponseStore

    notes = plant_notes(tmp_path)
    (tmp_path / "responses.jsonl").symlink_to(notes)
    with pytest.raises(SafeshapeError, match="symbolic link"):
        ResponseStore(tmp_path / "responses.jsonl", {"dtype": "float32"})
    assert notes.read_bytes() == NOTES


def test_train_overwrite_never_deletes_a_folder_it_did_not_write(tmp_path, model_dir, capsys):
    """Item 2: `train --overwrite` on a folder that holds only thesis.txt is refused and the folder kept; a link at
    OUT (item 3's shape, for train) is refused too."""
    data = testing.write_tiny_dataset(tmp_path / "d.jsonl", 4, "sft", seed=1)
    out = tmp_path / "thesis"
    out.mkdir()
    (out / "thesis.txt").write_bytes(NOTES)
    args = ["train", "--model", str(model_dir), "--data", str(data), "--loss", "sft", "--max-steps", "1",
            "--no-progress"]
    assert cli_main(args + ["--out", str(out), "--overwrite"]) == 2
    assert "replaces only an output folder safeshape wrote" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["thesis.txt"] and (out / "thesis.txt").read_bytes() == NOTES
    link = tmp_path / "link"
    link.symlink_to(out, target_is_directory=True)
    for extra in ([], ["--overwrite"], ["--resume"]):
        assert cli_main(args + ["--out", str(link)] + extra) == 2, extra
        assert "symbolic link" in capsys.readouterr().err
    assert sorted(os.listdir(out)) == ["thesis.txt"]


def test_train_refuses_links_inside_its_run_folder(tmp_path, model_dir, capsys):
    """A run folder (ours) being resumed with a planted link where train appends or writes (metrics, summary, the
    reporters' log folders): refused, the target untouched."""
    data = testing.write_tiny_dataset(tmp_path / "d.jsonl", 4, "sft", seed=1)
    notes = plant_notes(tmp_path)
    for name in ("metrics.jsonl", "train_summary.json", "runs"):
        out = tmp_path / f"run-{name}"
        out.mkdir()
        io.write_manifest(out, "train")
        (out / name).symlink_to(notes)
        rc = cli_main(["train", "--model", str(model_dir), "--data", str(data), "--loss", "sft", "--max-steps", "1",
                       "--no-progress", "--out", str(out), "--resume", "--report-to", "tensorboard"])
        assert rc == 2 and "symbolic link" in capsys.readouterr().err, name
        assert notes.read_bytes() == NOTES


def test_project_overwrite_through_a_linked_out_is_refused(tmp_path, capsys):
    """Item 3: `project --overwrite` with --out a link to an unrelated folder leaves that folder as it was; a real
    folder that is not ours is not replaced either; our own output is."""
    from safeshape.safelora.example import make_example

    ex = tmp_path / "ex"
    make_example(ex, hidden=32, intermediate=48, layers=1, heads=2, kv_heads=1, vocab=64, r=2, progress=False)
    unrelated = tmp_path / "photos"
    unrelated.mkdir()
    (unrelated / "a.jpg").write_bytes(NOTES)
    link = tmp_path / "out"
    link.symlink_to(unrelated, target_is_directory=True)
    args = ["project", "--base", str(ex / "base"), "--aligned", str(ex / "aligned"), "--adapter", str(ex / "adapter"),
            "--num-layers", "1", "--quiet", "--overwrite"]
    assert cli_main(args + ["--out", str(link)]) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert sorted(os.listdir(unrelated)) == ["a.jpg"] and link.is_symlink()
    assert cli_main(args + ["--out", str(unrelated)]) == 2
    assert "replaces only an output folder safeshape wrote" in capsys.readouterr().err
    assert sorted(os.listdir(unrelated)) == ["a.jpg"]
    ours = tmp_path / "ours"
    assert cli_main(args + ["--out", str(ours)]) == 0 and io.is_our_output(ours)
    assert cli_main(args + ["--out", str(ours)]) == 0  # our own output is replaced
    notes = plant_notes(tmp_path)
    (tmp_path / "rep.json").symlink_to(notes)
    assert cli_main(args + ["--out", str(tmp_path / "o2"), "--report", str(tmp_path / "rep.json")]) == 2
    assert notes.read_bytes() == NOTES and not (tmp_path / "o2").exists()


@pytest.mark.parametrize("flag", ["--out", "--report"])
def test_star_refuses_a_dangling_link(tmp_path, flag, capsys):
    """Item 7: `star --out` (or --report) a dangling link: refused before the guard loads, nothing created."""
    data = tmp_path / "in.jsonl"
    data.write_text(json.dumps({"prompt": "Hi", "response": "Hello there friend"}) + "\n")
    link = tmp_path / "link"
    link.symlink_to(tmp_path / "elsewhere.jsonl")
    args = {"--out": str(tmp_path / "o.jsonl"), "--report": None}
    args[flag] = str(link)
    argv = ["star", "--guard", str(tmp_path / "no-guard"), "--data", str(data), "--out", args["--out"]]
    if args["--report"]:
        argv += ["--report", args["--report"]]
    assert cli_main(argv) == 2
    assert "symbolic link" in capsys.readouterr().err
    assert not (tmp_path / "elsewhere.jsonl").exists() and link.is_symlink()


def test_annotate_file_refuses_a_link(tmp_path):
    from safeshape.star import annotate_file
    from tests import star_common

    model, tok = star_common.guard()
    src = tmp_path / "in.jsonl"
    src.write_text(json.dumps({"prompt": "Hi", "response": "Hello there friend"}) + "\n")
    notes = plant_notes(tmp_path)
    out = tmp_path / "o.jsonl"
    out.symlink_to(notes)
    for overwrite in (False, True):
        with pytest.raises(SafeshapeError, match="symbolic link"):
            annotate_file(model, tok, src, out, "llama-guard-3", progress=False, overwrite=overwrite)
    assert notes.read_bytes() == NOTES


def test_demo_workdir_link_is_refused(tmp_path):
    from safeshape.demo.pipeline import Demo

    (tmp_path / "wd").symlink_to(tmp_path / "elsewhere", target_is_directory=True)
    with pytest.raises(SafeshapeError, match="symbolic link"):
        Demo(tmp_path / "wd", fast=True, progress=False, overwrite=True)
    assert not (tmp_path / "elsewhere").exists()


# ---- hub revisions (item 4) -------------------------------------------------------------------------------------

@pytest.mark.parametrize("revision", ["../../../x", "main/../../x", "..", "a/b", ".hidden", "x.lock", "a\\b",
                                      "v1 ", "refs/heads/../../x"])
def test_hub_revision_with_path_components_is_refused(hub_cache, tmp_path, revision):
    from safeshape import hub

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    testing.hub_cache_layout(hub_cache, "org/name", src)
    # what the revision would reach: a ref file and a "snapshot" outside refs/ and the cache
    outside = hub_cache.parent / "x"
    outside.mkdir(exist_ok=True)
    (outside / "config.json").write_text("{}")
    with pytest.raises(SafeshapeError, match="revision .* neither a commit hash nor a branch or tag name"):
        hub.resolve_folder(f"org/name@{revision}", "--model")


def test_hub_ref_file_that_points_outside_the_snapshots_is_refused(hub_cache, tmp_path):
    from safeshape import hub

    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    snap = testing.hub_cache_layout(hub_cache, "org/name", src)
    assert os.path.samefile(hub.resolve_folder("org/name@main", "--model"), snap)  # a branch name is fine
    assert os.path.samefile(hub.resolve_folder("org/name@" + snap.name, "--model"), snap)  # and a commit hash
    testing.hub_cache_layout(hub_cache, "org/name", src, revision="v1.0-rc_2", commit="e" * 40)
    assert hub.resolve_folder("org/name@v1.0-rc_2", "--model").endswith("e" * 40)
    (hub_cache / "models--org--name" / "refs" / "refs" / "pr").mkdir(parents=True)  # hub PR refs: refs/refs/pr/N
    testing.hub_cache_layout(hub_cache, "org/name", src, revision="refs/pr/3", commit="d" * 40)
    assert hub.resolve_folder("org/name@refs/pr/3", "--model").endswith("d" * 40)
    outside = hub_cache.parent / "x"
    outside.mkdir()
    (outside / "config.json").write_text("{}")
    repo = hub_cache / "models--org--name"
    (repo / "refs" / "main").write_text("../../../x")  # a planted ref file: its content is a path
    with pytest.raises(SafeshapeError, match="not a snapshot folder of org/name"):
        hub.resolve_folder("org/name", "--model")


# ---- NaN stops training (item 5) --------------------------------------------------------------------------------

def test_a_nan_weight_stops_training_naming_the_step_and_the_weight(tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    weights = load_file(model / "model.safetensors")
    key = next(k for k in sorted(weights) if k.endswith("layers.1.mlp.down_proj.weight"))
    weights[key][3, 5] = float("nan")
    save_file(weights, model / "model.safetensors", metadata={"format": "pt"})
    data = testing.write_tiny_dataset(tmp_path / "d.jsonl", 4, "sft", seed=1)
    out = tmp_path / "run"
    rc = cli_main(["train", "--model", str(model), "--data", str(data), "--loss", "sft", "--max-steps", "2",
                   "--batch-size", "2", "--no-progress", "--out", str(out)])
    err = capsys.readouterr().err
    assert rc == 2 and "step 1:" in err and "not finite" in err, err
    assert "the weight base_model.model.model.layers.1.mlp.down_proj" in err, err
    assert not (out / "adapter_config.json").exists() and not (out / "train_summary.json").exists()
    assert not (out / "metrics.jsonl").exists() or not (out / "metrics.jsonl").read_text().strip()
    assert torch.isnan(weights[key]).any()


def test_a_nan_loss_later_keeps_the_last_good_checkpoint(tmp_path, monkeypatch):
    """The loss turns NaN at step 3: steps 1-2 and checkpoint-2 are kept, no step-3 line, no final adapter, and the
    weights in checkpoint-2 are finite."""
    from safetensors.torch import load_file

    from safeshape.trainer import TrainConfig, loop

    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp_path / "d.jsonl", 8, "sft", seed=1)
    real = loop.Run.micro_loss
    calls = []

    def micro_loss(self, batch, num_items, policy=None):
        out = real(self, batch, num_items, policy)
        calls.append(1)
        if len(calls) == 3:  # the third step (one micro-batch a step)
            out.loss = out.loss * float("nan")
        return out

    monkeypatch.setattr(loop.Run, "micro_loss", micro_loss)
    out = tmp_path / "run"
    cfg = TrainConfig(model=str(model), data=str(data), out=str(out), loss="sft", max_steps=4, batch_size=2,
                      save_every=2, progress=False)
    with pytest.raises(SafeshapeError, match=r"step 3: the loss is nan .*Checkpoints written before it are kept"):
        loop.train(cfg)
    assert [json.loads(line)["step"] for line in (out / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("checkpoint-")) == ["checkpoint-2"]
    assert not (out / "adapter_config.json").exists()
    import torch

    assert all(torch.isfinite(t).all() for t in load_file(out / "checkpoint-2" / "adapter_model.safetensors").values())


# ---- resume files reject duplicate keys (item 6) -----------------------------------------------------------------

def test_responses_with_a_duplicated_row_are_refused(tmp_path):
    from safeshape.eval.store import ResponseStore

    path = tmp_path / "responses.jsonl"
    store = ResponseStore(path, {"dtype": "float32"})
    rows = [{"model": "base", "source": "/m", "set": "harmful", "index": i, "prompt": f"p{i}",
             "response": "Sure, here is how", "new_tokens": 4, "finished": True} for i in range(3)]
    store.append(rows)
    assert len(ResponseStore(path, {"dtype": "float32"}).rows) == 3
    edited = {**rows[1], "response": "I'm sorry, I cannot help with that."}
    with open(path, "a") as f:
        f.write(json.dumps(edited) + "\n")
    before = path.read_bytes()
    with pytest.raises(SafeshapeError, match=r"responses.jsonl:5: a second row for model 'base', harmful prompt 1 "
                                             r"\(the first is line 3\)"):
        ResponseStore(path, {"dtype": "float32"})
    assert path.read_bytes() == before
    path.write_bytes(before.replace(b'"index": 1,', b'"index": [1],', 1))
    with pytest.raises(SafeshapeError, match="'index' an integer"):
        ResponseStore(path, {"dtype": "float32"})


# ---- a Jinja sandbox escape in eval's template (item 8) ---------------------------------------------------------

ESCAPE = ("{% for m in messages %}{{ m.content.__class__.__mro__[1].__subclasses__() }}{% endfor %}"
          "{% if add_generation_prompt %}assistant:{% endif %}")


def test_a_sandbox_escape_in_the_policy_template_is_a_clear_error_everywhere(tmp_path, capsys):
    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    cfg_path = model / "tokenizer_config.json"
    tc = json.loads(cfg_path.read_text())
    tc["chat_template"] = ESCAPE
    cfg_path.write_text(json.dumps(tc))
    for stray in model.glob("chat_template.*"):
        stray.unlink()
    rc = cli_main(["eval", "--model", str(model), "--harmful", str(harmful_csv(tmp_path)), "--out",
                   str(tmp_path / "o"), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and "the chat template failed" in err and "SecurityError" in err, err
    assert "Traceback" not in err
    data = testing.write_tiny_dataset(tmp_path / "d.jsonl", 2, "sft", seed=1)
    rc = cli_main(["train", "--model", str(model), "--data", str(data), "--loss", "sft", "--max-steps", "1",
                   "--no-progress", "--out", str(tmp_path / "t")])
    err = capsys.readouterr().err
    assert rc == 2 and "chat template failed" in err, err


# ---- a save_to_disk folder with an unexpected column (item 9) ---------------------------------------------------

def test_save_to_disk_with_an_unexpected_column_is_a_clear_error(tmp_path):
    datasets = pytest.importorskip("datasets")
    pa = pytest.importorskip("pyarrow")
    from safeshape.datafiles import read_rows

    folder = tmp_path / "ds"
    datasets.Dataset.from_list([{"prompt": "a", "response": "b"}] * 3).save_to_disk(str(folder))
    arrow = next(folder.glob("*.arrow"))
    table = pa.Table.from_pylist([{"prompt": "a", "response": "b", "evil": "x"}] * 3)
    with pa.OSFile(str(arrow), "wb") as sink, pa.ipc.new_stream(sink, table.schema) as writer:
        writer.write_table(table)
    with pytest.raises(SafeshapeError, match=f"{folder}: cannot read .*save_to_disk folder") as info:
        read_rows(folder)
    assert info.value.__cause__ is not None  # the datasets error is kept as the cause


# ---- a template that prints the date is never left unpinned silently --------------------------------------------

def test_date_pinning_check_is_not_skipped_when_the_template_fails():
    import copy

    from safeshape.star import get_preset
    from safeshape.star.template import GuardTemplate
    from tests import star_common

    tok = copy.deepcopy(star_common.tokenizer())
    tok.chat_template = ("{{ strftime_now('%Y-%m-%d') }} 'safe' or 'unsafe' {% for m in messages %}{{ m.content }}"
                         "{% endfor %}{{ raise_exception('this template fails on every input') }}")
    with pytest.raises(SafeshapeError, match="prints today's date, and rendering it .* failed: .*every input") as info:
        GuardTemplate(tok, get_preset("llama-guard-3"))
    assert info.value.__cause__ is not None
