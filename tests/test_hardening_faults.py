"""Fault injection: `safeshape project --overwrite`, `safeshape train` and `safeshape star` are killed with SIGKILL
at commit points (just before/after a rename, an exchange or a safetensors write, sampled with a fixed seed) and at
observable events (rows in OUT, a checkpoint or temporary folder appearing; never a wall-clock delay, so a loaded
machine changes nothing), then rerun. Nothing may be lost, duplicated or torn: OUT is always the old or the new
output (or recoverable by the next run), the rerun gives exactly what an uninterrupted run gives, and no
temporaries are left."""
import json
import os
import random
import subprocess
import sys
from pathlib import Path


from safeshape import io, testing
from safeshape.safelora.example import make_example

RUNNER = Path(__file__).with_name("fault_runner.py")
SEED = 10
REPORT = "safelora_report.json"
HANG_GUARD_S = 3 * 3600


def run_steps(tmp_path, steps, name):
    steps_path, results_path = tmp_path / f"{name}.steps.json", tmp_path / f"{name}.results.json"
    steps_path.write_text(json.dumps(steps))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(
        [str(Path(__import__("safeshape").__file__).parents[1])] + os.environ.get("PYTHONPATH", "").split(os.pathsep))}
    # the runner waits for events; HANG_GUARD_S only turns a hang into a failure, far above any run at load 50
    proc = subprocess.run([sys.executable, str(RUNNER), str(steps_path), str(results_path)], env=env,
                          capture_output=True, text=True, timeout=HANG_GUARD_S)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    return json.loads(results_path.read_text())


def hidden(folder: Path) -> list[str]:
    """Hidden leftovers (temporaries); the output manifest of safeshape.io is not one."""
    return sorted(p.name for p in folder.iterdir() if p.name.startswith(".") and p.name != io.MANIFEST)


def without_report(snap):
    if snap is None:
        return None
    assert REPORT in snap, "an OUT without its report is torn"
    return {k: v for k, v in snap.items() if k != REPORT}


def kill_points(n: int, k: int, rng: random.Random) -> list[str]:
    points = [f"{w}:{i}" for i in range(1, n + 1) for w in ("before", "after")]
    return sorted(rng.sample(points, min(k, len(points))))


def test_project_overwrite_survives_kill_9(tmp_path):
    ex = tmp_path / "ex"
    make_example(ex, hidden=32, intermediate=48, layers=1, heads=2, kv_heads=1, vocab=64, r=2, progress=False)
    out, old, new = tmp_path / "work" / "out", tmp_path / "old", tmp_path / "new"
    common = ["project", "--base", str(ex / "base"), "--aligned", str(ex / "aligned"), "--adapter", str(ex / "adapter"),
              "--quiet"]
    old_args = common + ["--select", "threshold", "--threshold", "0.0"]
    new_args = common + ["--num-layers", "2", "--out", str(out), "--overwrite"]
    setup = run_steps(tmp_path, [
        {"argv": old_args + ["--out", str(old)], "snapshot": str(old)},
        {"argv": common + ["--num-layers", "2", "--out", str(new)], "snapshot": str(new)},
        {"copy": [str(old), str(out)]},
        {"argv": new_args, "snapshot": str(out)},
        {"copy": [str(old), str(out)]},
        {"argv": new_args, "exchange": False, "snapshot": str(out)},
    ], "setup")
    assert [r["status"] for r in setup] == ["exit:0", "exit:0", "copied", "exit:0", "copied", "exit:0"]
    s_old, s_new = without_report(setup[0]["snapshot"]), without_report(setup[1]["snapshot"])
    assert s_old != s_new and without_report(setup[3]["snapshot"]) == s_new
    rng = random.Random(SEED)
    n_exchange, n_fallback = setup[3]["points"], setup[5]["points"]
    # sampled points, plus the windows that matter most: after the exchange (the old output sits in the
    # temporary), and after the fallback moved OUT aside (no OUT until the next rename)
    scenarios = [(p, True) for p in sorted(set(kill_points(n_exchange, 3, rng)) | {f"after:{n_exchange}"})]
    scenarios += [(p, False) for p in sorted(set(kill_points(n_fallback, 3, rng)) | {f"after:{n_fallback - 1}"})]
    # and while the new output is being written (its temporary folder exists)
    scenarios += [(f"exists:{out.parent}/.{out.name}.tmp-*", rng.random() < 0.5)]
    steps = []
    for kill, exchange in scenarios:
        steps += [{"copy": [str(old), str(out)]},
                  {"argv": new_args, "kill": kill, "exchange": exchange, "snapshot": str(out)},
                  # without --overwrite: refused, and whatever OUT was before the kill is there (restored if needed)
                  {"argv": common + ["--num-layers", "2", "--out", str(out)], "exchange": exchange,
                   "snapshot": str(out)},
                  {"argv": new_args, "exchange": exchange, "snapshot": str(out)}]
    results = run_steps(tmp_path, steps, "kills")
    killed = parked = 0
    for i, (kill, exchange) in enumerate(scenarios):
        _, after_kill, refused, rerun = results[4 * i:4 * i + 4]
        where = f"kill {kill} (exchange={exchange}, seed {SEED})"
        killed += after_kill["status"] == "killed"
        if after_kill["snapshot"] is not None:
            assert without_report(after_kill["snapshot"]) in (s_old, s_new), where
        else:
            assert not exchange, f"{where}: OUT vanished although the swap is one exchange"
            parked += 1
        assert refused["status"] == "exit:2", where
        assert without_report(refused["snapshot"]) in (s_old, s_new), f"{where}: the old OUT was lost"
        assert rerun["status"] == "exit:0" and without_report(rerun["snapshot"]) == s_new, where
    assert killed >= len(scenarios) - 1  # the event kill may come after the run ended
    assert parked >= 1  # the fallback's window (OUT moved aside) was hit, and the next run restored it
    assert hidden(out.parent) == []


def test_train_survives_kill_9(tmp_path):
    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp_path / "d.jsonl", 8, "sft", seed=3)
    base = ["train", "--model", str(model), "--data", str(data), "--loss", "sft", "--lr", "5e-3", "--batch-size",
            "2", "--lora-r", "4", "--max-len", "96", "--max-steps", "3", "--save-every", "1", "--lora-dropout",
            "0.1", "--no-progress"]
    ref = tmp_path / "ref"
    first = run_steps(tmp_path, [{"argv": base + ["--out", str(ref)]}], "ref")
    assert first[0]["status"] == "exit:0"
    rng = random.Random(SEED)
    scenarios = kill_points(first[0]["points"], 3, rng) + ["exists:{out}/checkpoint-1", "exists:{out}/checkpoint-2"]
    steps = []
    for i, kill in enumerate(scenarios):
        out = tmp_path / f"run{i}"
        steps += [{"argv": base + ["--out", str(out)], "kill": kill.format(out=out)},
                  {"argv": base + ["--out", str(out), "--resume"]}]
    results = run_steps(tmp_path, steps, "kills")

    def tensors(folder: Path) -> dict:
        return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*.safetensors"))}

    def metrics(folder: Path) -> list[dict]:
        lines = (folder / "metrics.jsonl").read_text().splitlines()
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in lines]

    want_tensors, want_metrics = tensors(ref), metrics(ref)
    assert [m["step"] for m in want_metrics] == [1, 2, 3]
    assert sorted(want_tensors) == ["adapter_model.safetensors"] + [
        f"checkpoint-{s}/{f}" for s in (1, 2, 3) for f in ("adapter_model.safetensors", "trainer_state.safetensors")]
    killed = 0
    for i, kill in enumerate(scenarios):
        out = tmp_path / f"run{i}"
        where = f"kill {kill} (seed {SEED})"
        killed += results[2 * i]["status"] == "killed"
        assert results[2 * i + 1]["status"] == "exit:0", where
        assert tensors(out) == want_tensors, f"{where}: the resumed run differs from the uninterrupted one"
        assert metrics(out) == want_metrics, f"{where}: metrics lost, duplicated or torn"
        assert (out / "adapter_config.json").exists() and (out / "train_summary.json").exists(), where
        assert hidden(out) == [], where
    assert killed >= len(scenarios) - 2  # an event kill may come after the run ended


def test_star_survives_kill_9(tmp_path):
    """`safeshape star` killed with SIGKILL once OUT holds 1, 4, 12, 25, 40 and 55 of its 60 rows (events, not
    times: loading the guard may take any time on a loaded machine), then rerun: OUT ends up with every row exactly
    once, equal to an uninterrupted run (a torn last row is cut and rescored, no row twice)."""
    from safeshape.star import tiny

    from tests.test_star_annotate import assert_same_rows, read_jsonl, write_jsonl

    tiny.save_tiny_guard(tmp_path / "guard")
    src = tmp_path / "in.jsonl"
    write_jsonl(src, [{"id": i, "prompt": f"Question {i}?", "response": tiny.random_text(30, i)} for i in range(60)])
    base = ["star", "--guard", str(tmp_path / "guard"), "--data", str(src), "--chunk-words", "3", "--batch-size", "1",
            "--no-progress"]
    ref = run_steps(tmp_path, [{"argv": base + ["--out", str(tmp_path / "ref.jsonl")]}], "ref")
    assert ref[0]["status"] == "exit:0"
    want = read_jsonl(tmp_path / "ref.jsonl")
    rows = [1, 4, 12, 25, 40, 55]
    outs = [tmp_path / f"run{i}.jsonl" for i in range(len(rows))]
    kills = run_steps(tmp_path, [{"argv": base + ["--out", str(o)], "kill": f"rows:{n}:{o}"} for o, n in zip(outs, rows)],
                      "kills")
    # what the kills left: how many complete rows, and whether the last one was torn mid-write
    left = [(o.read_bytes().count(b"\n"), not o.read_bytes().endswith(b"\n")) if o.exists() else (0, False)
            for o in outs]
    reruns = run_steps(tmp_path, [{"argv": base + ["--out", str(o)]} for o in outs], "reruns")
    for o, n, k, r in zip(outs, rows, kills, reruns):
        assert r["status"] == "exit:0", f"rerun after a kill at {n} rows"
        assert_same_rows(read_jsonl(o), want)
        assert hidden(tmp_path) == [], f"kill at {n} rows left temporaries"
    # the kills landed while rows were being written (some rows done, not all): at least the one at the first row
    assert any(k["status"] == "killed" and 0 < n < len(want) for k, (n, _) in zip(kills, left)), left
    assert all(n >= want_n for (n, _), want_n, k in zip(left, rows, kills) if k["status"] == "killed"), left
