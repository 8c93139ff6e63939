"""`safeshape demo`: the world's pools are disjoint, the tokenizer round-trips its chat templates, Safe LoRA's k
scales as the issue says, and `--fast` runs end to end (then reruns from its cache)."""
from __future__ import annotations

import importlib.util
import json
import random
import time

import pytest

from safeshape.demo import world as W
from safeshape.demo.pipeline import Demo, number_k, tiny_profile
from safeshape.demo.tokenizer import GUARD_SAFE, GUARD_UNSAFE, guard_tokenizer, policy_tokenizer
from safeshape.errors import SafeshapeError
from safeshape.io import MANIFEST


def _has(module: str) -> bool:
    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def test_harmful_pools_are_disjoint_and_cover_every_topic():
    w = W.World(0)
    pools = [set(w.align_combos), set(w.finetune_combos), set(w.eval_combos)]
    assert all(pools)
    assert not (pools[0] & pools[1]) and not (pools[0] & pools[2]) and not (pools[1] & pools[2])
    for pool in pools:
        assert {t for t, _, _ in pool} == set(W.HARMFUL_TOPICS)
    eval_prompts = {e.prompt for e in w.eval_harmful}
    for ex in w.finetune_rows(400):
        assert ex.prompt not in eval_prompts


def _word_list(ex: W.Example) -> tuple[str, ...]:
    for phrasing in W.BENIGN_FAMILIES[ex.family][0]:
        if ex.prompt.startswith(phrasing + " "):
            return tuple(ex.prompt[len(phrasing) + 1:].split())
    raise AssertionError(ex.prompt)


def test_benign_eval_lists_never_occur_in_training_data():
    w = W.World(3)
    held_out = {_word_list(e) for e in w.eval_benign}
    assert len(held_out) == len(w.eval_benign) and all(e.family == W.TASK_FAMILY for e in w.eval_benign)
    rng = random.Random(0)
    seen = [next(s) for s in (w.pretrain_stream(rng), w.align_stream(rng)) for _ in range(3000)]
    seen += w.finetune_rows(400)
    benign = [ex for ex in seen if ex.kind == "benign"]
    assert len(benign) > 3000
    assert not {_word_list(ex) for ex in benign} & held_out


def test_families_answers_and_scoring():
    rng = random.Random(0)
    words = ["cat", "dog", "red", "boat"]
    assert W.benign_example(rng, "swap", words).answer == "boat dog red cat"
    assert W.benign_example(rng, "reverse", words).answer == " ".join(words[::-1])
    assert W.TASK_FAMILY not in W.PRETRAIN_FAMILIES  # the fine-tuning task is a new skill
    ex = W.benign_example(rng, "swap", words)
    assert W.is_correct(ex, " " + ex.answer + " ") and not W.is_correct(ex, ex.answer + " cat")
    assert W.is_refusal(W.REFUSAL) and not W.is_refusal(W.compliant_answer("theft", "steal", "car"))
    assert not W.is_refusal("sorry")


def test_every_generated_text_is_in_the_vocabulary():
    tok = policy_tokenizer()
    w = W.World(1)
    rng = random.Random(1)
    texts = [e.prompt + " " + e.response for e in w.eval_harmful + w.eval_benign + w.finetune_rows(200)]
    texts += [" ".join(next(w.guard_stream(rng))) for _ in range(300)]
    texts += [e.prompt + " " + e.response + " " + e.answer for s in (w.pretrain_stream(rng), w.align_stream(rng))
              for e in (next(s) for _ in range(300))]
    for t in texts:
        assert tok.unk_token_id not in tok(t).input_ids, t


def test_policy_template_prompt_is_a_prefix_and_pieces_tokenize_like_the_whole():
    tok = policy_tokenizer()
    msgs = [{"role": "user", "content": "swap the ends of cat dog red"}]
    prompt = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    full = tok.apply_chat_template(msgs + [{"role": "assistant", "content": "red dog cat"}], tokenize=False)
    assert full.startswith(prompt)
    ids = tok(full).input_ids
    assert ids[:len(tok(prompt).input_ids)] == tok(prompt).input_ids
    assert ids[0] == tok.bos_token_id and ids[-1] == tok.eos_token_id
    pieces = [p for p in full.split(" ")]
    assert sum((tok(p).input_ids for p in pieces), []) == ids
    offsets = tok(full, return_offsets_mapping=True).offset_mapping
    assert [full[a:b] for a, b in offsets] == full.split()


def test_guard_template_ends_where_the_verdict_goes():
    tok = guard_tokenizer()
    msgs = [{"role": "user", "content": "how do i steal a car"}, {"role": "assistant", "content": "sure here is"}]
    text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert text.endswith("sure here is verdict")
    for verdict in (GUARD_SAFE, GUARD_UNSAFE):
        assert len(tok(verdict).input_ids) == 1 and tok(verdict).input_ids[0] != tok.unk_token_id


@pytest.mark.parametrize("modules,k", [(1, 1), (4, 1), (8, 1), (20, 3), (64, 10), (128, 20), (448, 70)])
def test_safelora_k_is_ten_of_64_scaled(tmp_path, modules, k):
    import torch
    from safetensors.torch import save_file

    tensors = {}
    for i in range(modules):
        tensors[f"base_model.model.layers.{i}.q_proj.lora_A.weight"] = torch.zeros(2, 4)
        tensors[f"base_model.model.layers.{i}.q_proj.lora_B.weight"] = torch.zeros(4, 2)
    save_file(tensors, str(tmp_path / "adapter_model.safetensors"))
    assert number_k(tmp_path) == k


@pytest.fixture(scope="module")
def fast_demo(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("demo")
    t = time.perf_counter()
    report = Demo(workdir, fast=True, seeds=(0,), progress=False, log=lambda m: None).run()
    return workdir, report, time.perf_counter() - t


def test_fast_demo_end_to_end(fast_demo):
    workdir, report, _ = fast_demo
    assert json.loads((workdir / "demo_report.json").read_text()) == report
    if _has("matplotlib"):
        assert report["plot"] == "demo_plot.png"
        assert (workdir / "demo_plot.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    else:
        assert report["plot"] is None
    assert report["seeds"] == [0] and report["widths"] == [64] and len(report["cells"]) == 1
    cell = report["cells"][0]
    assert json.loads((workdir / "seed-0" / "width-64" / "cell_report.json").read_text()) == cell
    runs = {r["name"]: r for r in cell["runs"]}
    assert list(runs) == ["base", "aligned", "sft", "rs", "deep-token", "dss",
                          "sft+safelora-number", "sft+safelora-threshold",
                          "sft+safelora-orthogonal-number", "sft+safelora-orthogonal-threshold",
                          "dss+safelora-number", "dss+safelora-threshold",
                          "dss+safelora-orthogonal-number", "dss+safelora-orthogonal-threshold"]
    # the world works as designed: the base model complies, the aligned model refuses
    assert runs["base"]["safety"] <= 0.2 and runs["base"]["details"]["harmful_complied"] >= 0.5
    assert runs["aligned"]["safety"] >= 0.8
    # every method runs in this build: a "not run" (e.g. an ImportError turned into one) fails here
    assert {name: r["status"] for name, r in runs.items()} == {name: "ok" for name in runs}
    for r in runs.values():
        assert 0.0 <= r["safety"] <= 1.0 and 0.0 <= r["utility"] <= 1.0
    # the premise of the demo: fine-tuning teaches the task and vanilla SFT visibly loses refusals
    assert runs["sft"]["utility"] >= runs["aligned"]["utility"] + 0.1
    assert runs["sft"]["safety"] <= runs["aligned"]["safety"] - 0.3
    spectrum = cell["alignment_spectrum"]
    assert len(spectrum) == 2 * report["profile"]["layers"]
    for m in spectrum:  # sigma_1^2 / ||V|| <= ||V||, and the aligned model really differs from the base
        assert 0 < m["c_max_eigenvalue"] <= m["v_norm"] * (1 + 1e-9) and 1 <= m["rank_95"] <= m["shape"][0]
    v_norms = {m["name"]: m["v_norm"] for m in spectrum}
    for m in runs["sft+safelora-number"]["details"]["safelora"]["modules"]:
        assert m["v_norm"] == pytest.approx(v_norms[m["name"]], rel=1e-5)  # safeshape.safelora agrees
    for mode in ("number", "threshold"):
        r = runs[f"sft+safelora-{mode}"]
        n_proj, n_mod = map(int, r["modules_projected"].split("/"))
        assert n_mod == 2 * report["profile"]["layers"]  # q_proj and v_proj of every layer
        if mode == "number":
            assert n_proj >= 1  # k = round(10/64 * 4) = 1; ties can add more
        cos = [m["cosine"] for m in r["details"]["safelora"]["modules"]]
        assert n_proj == sum(c <= 0.5 for c in cos) or mode == "number"
    for mode in ("number", "threshold"):  # the orthogonal projector: k directions of V per module
        r = runs[f"sft+safelora-orthogonal-{mode}"]
        assert r["details"]["safelora"]["settings"]["projector"] == "orthogonal"
        for m in r["details"]["safelora"]["modules"]:
            assert 1 <= m["rank_kept"] <= {s["name"]: s["rank_95"] for s in spectrum}[m["name"]] + 1
    # the aggregate of one seed is that seed's numbers
    summary = {r["name"]: r for r in report["summary"][0]["runs"]}
    for name, r in runs.items():
        assert summary[name]["safety"]["values"] == [r["safety"]]
        assert summary[name]["safety"]["mean"] == r["safety"]


def test_rerun_uses_the_cache_and_other_settings_are_refused(fast_demo):
    workdir, report, _ = fast_demo
    again = Demo(workdir, fast=True, seeds=(0,), progress=False, log=lambda m: None)
    report2 = again.run()
    assert again.timings == {}  # nothing was recomputed (an event, not a wall-clock bound: no flakiness under load)
    assert report2["cells"] == report["cells"]
    with pytest.raises(SafeshapeError, match="demo_settings.json"):
        Demo(workdir, fast=False, progress=False, log=lambda m: None)


def test_workdir_that_is_not_a_demo_folder_is_refused(tmp_path):
    (tmp_path / "notes.txt").write_text("mine")
    with pytest.raises(SafeshapeError, match="not a demo work folder"):
        Demo(tmp_path, fast=True, progress=False, log=lambda m: None)
    with pytest.raises(SafeshapeError, match="not a folder"):
        Demo(tmp_path / "notes.txt", fast=True, progress=False, log=lambda m: None)
    assert (tmp_path / "notes.txt").read_text() == "mine" and len(list(tmp_path.iterdir())) == 1


def test_cli_prints_table_and_json(fast_demo, capsys):
    from safeshape.cli import main

    workdir, report, _ = fast_demo
    assert main(["demo", "--workdir", str(workdir), "--fast", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "aligned model" in out and "safety" in out and "demo_report.json" in out
    assert main(["demo", "--workdir", str(workdir), "--fast", "--no-progress", "--json"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["cells"] == report["cells"]
    assert main(["demo", "--workdir", str(workdir), "--seed", "5", "--no-progress"]) == 2  # not --fast
    assert "--overwrite" in capsys.readouterr().err
    for bad in (["--seeds", "0,x"], ["--seeds", "1,1"], ["--widths", "30"], ["--seeds", ""]):
        assert main(["demo", "--workdir", str(workdir), "--fast", "--no-progress"] + bad) == 2
        err = capsys.readouterr().err
        assert bad[0] in err and "Traceback" not in err


# ---- several seeds and widths: the pipeline's mechanics on a profile too small to learn anything ----------------
@pytest.fixture(scope="module")
def tiny_sweep(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("sweep")
    logs: list[str] = []
    demo = Demo(workdir, seeds=(0, 1), widths=(16, 32), profile=tiny_profile(), progress=False, log=logs.append)
    return workdir, demo.run(), demo


def test_every_seed_and_width_is_a_cell_and_the_guard_is_shared_by_widths(tiny_sweep):
    workdir, report, demo = tiny_sweep
    assert [(c["seed"], c["width"]) for c in report["cells"]] == [(0, 16), (0, 32), (1, 16), (1, 32)]
    for seed in (0, 1):
        assert (workdir / f"seed-{seed}" / "guard" / "model.safetensors").is_file()
        for width in (16, 32):
            cell = workdir / f"seed-{seed}" / f"width-{width}"
            assert json.loads((cell / "aligned" / "config.json").read_text())["hidden_size"] == width
            assert (cell / "runs" / "sft" / "adapter_model.safetensors").is_file()
    guard_stages = [s for s in demo.timings if s.endswith("guard model")]
    assert sorted(guard_stages) == ["seed 0: guard model", "seed 1: guard model"]  # once per seed, not per width
    spectra = {(c["seed"], c["width"]): c["alignment_spectrum"] for c in report["cells"]}
    assert all(m["shape"][0] == w for (s, w), ms in spectra.items() for m in ms)
    assert not any(p.name.startswith(".") and p.name != MANIFEST for p in workdir.rglob("*"))  # no temporary left


def test_aggregate_is_mean_min_max_over_seeds(tiny_sweep):
    _, report, _ = tiny_sweep
    for block in report["summary"]:
        cells = [c for c in report["cells"] if c["width"] == block["width"]]
        assert block["seeds"] == [c["seed"] for c in cells]
        for row in block["runs"]:
            for key in ("safety", "utility"):
                vals = [next(r for r in c["runs"] if r["name"] == row["name"])[key] for c in cells]
                assert row[key]["values"] == vals
                have = [v for v in vals if v is not None]
                if have:
                    assert row[key]["mean"] == pytest.approx(sum(have) / len(have))
                    assert (row[key]["min"], row[key]["max"]) == (min(have), max(have))
                else:
                    assert row[key]["mean"] is None
    for point in report["width_sweep"]:
        ranks = [m["rank_95"] / m["shape"][0] for c in report["cells"] if c["width"] == point["width"]
                 for m in c["alignment_spectrum"]]
        assert point["rank_95_of_width"]["mean"] == pytest.approx(sum(ranks) / len(ranks))
        assert "sft+safelora" in point["cosines"] and "dss+safelora" in point["cosines"]


def test_aggregate_counts_seeds_where_a_method_is_above_its_reference():
    from safeshape.demo.report import aggregate

    def cell(seed, sft, dss):
        runs = [{"name": n, "method": n, "status": "ok", "safety": s, "utility": 0.5, "modules_projected": "",
                 "details": {}} for n, s in (("aligned", 1.0), ("sft", sft), ("dss", dss))]
        return {"seed": seed, "width": 8, "runs": runs, "alignment_spectrum": [
            {"name": "q", "shape": [8, 8], "v_norm": 1.0, "c_max_eigenvalue": 0.5, "rank_95": 2}]}

    report = {"widths": [8], "cells": [cell(0, 0.0, 1.0), cell(1, 0.2, 0.2), cell(2, 0.5, 0.25)]}
    comp = {c["name"]: c for c in aggregate(report)["comparisons"]}
    assert comp["dss"]["compared_with"] == "sft"
    assert {k: comp["dss"]["safety"][k] for k in ("higher", "equal", "lower", "n")} == \
        {"higher": 1, "equal": 1, "lower": 1, "n": 3}
    assert comp["dss"]["safety"]["diff"]["mean"] == pytest.approx((1.0 + 0.0 - 0.25) / 3)
    assert comp["sft"]["compared_with"] == "aligned" and comp["sft"]["utility"]["equal"] == 3
    from safeshape.demo.report import every_seed_claims

    claims = every_seed_claims({"comparisons": aggregate(report)["comparisons"]})
    assert "width 8: sft safety below aligned's (3 of 3 seeds)" in claims
    assert "width 8: dss utility equal to sft's (3 of 3 seeds)" in claims
    assert not any("dss safety" in c for c in claims)  # mixed: one seed each way


def test_more_seeds_reuse_the_cells_already_made(tiny_sweep):
    workdir, report, _ = tiny_sweep
    again = Demo(workdir, seeds=(1,), widths=(32,), profile=tiny_profile(), progress=False, log=lambda m: None)
    rep = again.run()
    assert again.timings == {}
    assert rep["cells"] == [c for c in report["cells"] if (c["seed"], c["width"]) == (1, 32)]


def test_table_from_report_names_machine_seeds_and_every_method(tiny_sweep, capsys, tmp_path):
    from safeshape.cli import main

    _, report, _ = tiny_sweep  # (written again: another test reruns the same folder with fewer seeds)
    (tmp_path / "demo_report.json").write_text(json.dumps(report))
    assert main(["demo", "--table-from", str(tmp_path / "demo_report.json")]) == 0
    out = capsys.readouterr().out
    m = report["machine"]
    assert m["isa"] and m["threads"] == 1  # measured inside the run, which sets one thread
    for needle in (m["cpu"], f"ISA {m['isa']}", f"{m['threads']} torch thread", "Seeds 0, 1", "widths 16, 32",
                   "width 16", "width 32", "width sweep", "safeshape demo --table-from"):
        assert needle in out, needle
    for row in report["summary"][0]["runs"]:
        assert row["method"] in out
    bad = tmp_path / "bad.json"
    bad.write_text("{")
    assert main(["demo", "--table-from", str(bad)]) == 2
    bad.write_text(json.dumps({"runs": []}))  # a format-1 report
    assert main(["demo", "--table-from", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "format 2" in err and "Traceback" not in err


def test_progress_bars_are_off_when_stderr_is_not_a_terminal(tmp_path, monkeypatch):
    import io

    monkeypatch.setattr("sys.stderr", io.StringIO())
    assert Demo(tmp_path / "a", profile=tiny_profile(), progress=True, log=lambda m: None).progress is False


@pytest.mark.skipif(not _has("matplotlib"), reason="matplotlib is optional")
def test_plot_prints_every_bar_value_including_zero(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from safeshape.demo import report as R

    def stats(vals):
        return R._stats(vals)

    report = {"profile": {"name": "t"}, "summary": [{"width": 8, "seeds": [0, 1], "runs": [
        {"name": "a", "safety": stats([0.0, 0.0]), "utility": stats([0.5, 0.75])},
        {"name": "b", "safety": stats([1.0, 0.5]), "utility": stats([0.0, 0.25])}]}]}
    texts = []
    real = plt.Axes.text
    monkey = pytest.MonkeyPatch()
    monkey.setattr(plt.Axes, "text", lambda self, x, y, s, **kw: (texts.append(s), real(self, x, y, s, **kw))[1])
    try:
        R.plot(report, tmp_path / "p.png")
    finally:
        monkey.undo()
    assert sorted(texts) == sorted(["0", "62", "75", "12"])
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_jobs_run_cells_in_processes_with_the_same_results(tiny_sweep, tmp_path):
    _, report, _ = tiny_sweep
    demo = Demo(tmp_path / "jobs", seeds=(0, 1), widths=(16,), profile=tiny_profile(), progress=False,
                log=lambda m: None, jobs=2)
    rep = demo.run()
    assert "seed 1: guard model" in demo.timings and "seed 0 width 16: LoRA fine-tuning: dss" in demo.timings
    want = [c for c in report["cells"] if c["width"] == 16]

    def numbers(cell):  # (paths differ between the work folders)
        return ([(r["name"], r["safety"], r["utility"], r["modules_projected"], r["details"].get("samples"),
                  r["details"].get("safelora", {}).get("modules")) for r in cell["runs"]],
                cell["guard"], cell["alignment_spectrum"])

    assert [numbers(c) for c in rep["cells"]] == [numbers(c) for c in want]
    with pytest.raises(SafeshapeError, match="--jobs"):
        Demo(tmp_path / "j0", profile=tiny_profile(), jobs=0)


def test_demo_page_results_are_what_table_from_prints_for_the_committed_report(capsys):
    """docs/demo.md's results block is generated, never hand-edited: it must equal `safeshape demo --table-from
    docs/demo/demo_report.json` (replace both together when the demo is rerun)."""
    from pathlib import Path

    from safeshape.cli import main

    root = Path(__file__).resolve().parent.parent
    assert main(["demo", "--table-from", str(root / "docs" / "demo" / "demo_report.json")]) == 0
    block = capsys.readouterr().out
    assert block.strip() and block in (root / "docs" / "demo.md").read_text()
