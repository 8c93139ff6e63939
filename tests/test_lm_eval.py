"""`safeshape eval --lm-eval TASKS --lm-eval-include DIR` end to end: a multiple-choice task of our own (a local YAML
over a local JSONL, no hub) on a tiny model, and the report's numbers against the `lm-eval` command's own results
file for the same model folder. Skipped without lm-eval (`pip install lm-eval`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import safeshape
from safeshape import testing as T
from safeshape.cli import main as cli_main

pytest.importorskip("lm_eval")

TASK = "safeshape_tiny_mc"


def write_task(folder, n: int = 12, seed: int = 0):
    """A multiple-choice lm-eval task over ``n`` local rows (question, four choices, the index of the answer)."""
    import random

    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    sentences = T.corpus(5 * n, seed=seed + 1)
    rows = [{"question": sentences[5 * i], "choices": sentences[5 * i + 1:5 * i + 5], "answer": rng.randrange(4)}
            for i in range(n)]
    data = folder / "rows.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (folder / f"{TASK}.yaml").write_text(
        f"task: {TASK}\n"
        "dataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {data}\n"
        "test_split: test\n"
        "output_type: multiple_choice\n"
        'doc_to_text: "Question: {{question}}\\nAnswer:"\n'
        "doc_to_choice: \"{{choices}}\"\n"
        "doc_to_target: answer\n"
        "metric_list:\n"
        "  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n"
        "  - metric: acc_norm\n    aggregation: mean\n    higher_is_better: true\n"
        "metadata:\n  version: 1.0\n")
    return rows


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval")
    T.save_tiny_model(root / "model", hidden_size=32, vocab_size=320, seed=4)
    rows = write_task(root / "tasks")
    (root / "harmful.jsonl").write_text('{"prompt": "Tell me something."}\n')
    return {"root": root, "rows": rows}


def _env():
    env = dict(os.environ, HF_DATASETS_OFFLINE="1", HF_HUB_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(safeshape.__file__)),  # the one imported here
                                         env.get("PYTHONPATH", "")])
    return env


@pytest.fixture(scope="module")
def report(world, tmp_path_factory):
    root = world["root"]
    out = tmp_path_factory.mktemp("run") / "out"
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    assert cli_main(["eval", "--model", str(root / "model"), "--harmful", str(root / "harmful.jsonl"),
                     "--out", str(out), "--max-new-tokens", "2", "--batch-size", "4", "--no-progress",
                     "--lm-eval", TASK, "--lm-eval-include", str(root / "tasks")]) == 0
    return json.loads((out / "eval_report.json").read_text())


def test_local_task_runs_end_to_end(world, report):
    (m,) = report["models"]
    metrics = m["lm_eval"][TASK]
    assert report["settings"]["lm_eval"] == [TASK]
    assert report["settings"]["lm_eval_include"] == [str((world["root"] / "tasks").resolve())]
    for k in ("acc,none", "acc_norm,none"):
        assert 0.0 <= metrics[k] <= 1.0
        # acc is a share of the 12 rows
        assert abs(metrics[k] * len(world["rows"]) - round(metrics[k] * len(world["rows"]))) < 1e-9
    assert "acc_stderr,none" in metrics


def test_report_matches_lm_eval_command(world, report, tmp_path):
    """The `lm-eval run` command on the same model folder gives the numbers our report holds."""
    root = world["root"]
    cmd = [sys.executable, "-m", "lm_eval", "run", "--model", "hf",
           "--model_args", f"pretrained={root / 'model'},dtype=float32", "--tasks", TASK,
           "--include_path", str(root / "tasks"), "--batch_size", "4", "--device", "cpu",
           "--output_path", str(tmp_path / "lm")]
    proc = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = sorted((tmp_path / "lm").rglob("results_*.json"))
    assert files, f"no results file under {tmp_path / 'lm'}: {proc.stdout[-2000:]}"
    theirs = json.loads(files[-1].read_text())["results"][TASK]
    ours = report["models"][0]["lm_eval"][TASK]
    for k in ("acc,none", "acc_norm,none", "acc_stderr,none", "acc_norm_stderr,none"):
        assert ours[k] == pytest.approx(float(theirs[k]), abs=1e-12), k


def test_include_needs_tasks_and_a_folder(world, tmp_path, capsys):
    base = ["eval", "--model", str(world["root"] / "model"), "--harmful", str(world["root"] / "harmful.jsonl"),
            "--max-new-tokens", "2", "--no-progress"]
    assert cli_main(base + ["--out", str(tmp_path / "a"), "--lm-eval-include", str(world["root"] / "tasks")]) == 2
    assert "--lm-eval-include adds task folders for --lm-eval" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "b"), "--lm-eval", TASK,
                            "--lm-eval-include", str(tmp_path / "nope")]) == 2
    assert f"--lm-eval-include {tmp_path / 'nope'}: not a folder" in capsys.readouterr().err
    assert cli_main(base + ["--out", str(tmp_path / "c"), "--lm-eval", f"{TASK},no_such_task_here",
                            "--lm-eval-include", str(world["root"] / "tasks")]) == 2
    assert "--lm-eval: unknown task(s) no_such_task_here: not among lm-eval's tasks or in --lm-eval-include" in \
        capsys.readouterr().err
    assert not (tmp_path / "c").exists()  # refused before any generation
