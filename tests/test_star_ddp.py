"""`torchrun --nproc_per_node 2 -m safeshape star` (gloo, CPU): rows sharded across ranks, each rank's part
resumable, and the merged OUT equal to the single-process output row for row."""
import json
import os
import subprocess
import sys

import pytest

import safeshape
from safeshape.star import tiny
from tests import star_common
from tests.test_star_annotate import ROWS, assert_same_rows, read_jsonl, run_cli, write_jsonl
from tests.torchrun_common import free_port as _free_port

one_thread = pytest.fixture(autouse=True)(star_common.one_thread)


def test_two_processes_equal_one(tmp_path, capsys):
    tiny.save_tiny_guard(tmp_path / "guard")
    src = tmp_path / "in.jsonl"
    rows = ROWS + [{"id": 5, "prompt": "And?", "response": tiny.random_text(11, 9)}]  # 6 rows: 3 per rank
    write_jsonl(src, rows, blank_after=2)
    common = ["--guard", str(tmp_path / "guard"), "--data", str(src), "--chunk-words", "3", "--batch-size", "2",
              "--no-progress", "--json"]
    assert run_cli(common + ["--out", str(tmp_path / "one.jsonl")]) == 0
    single = read_jsonl(tmp_path / "one.jsonl")
    capsys.readouterr()

    # rank 1 was killed after its first row (rows 1, 3, 5 are its shard), in the middle of writing the second
    out = tmp_path / "two.jsonl"
    part1 = tmp_path / "two.jsonl.part-1-of-2"
    line1 = json.dumps(single[1], ensure_ascii=False) + "\n"
    line3 = json.dumps(single[3], ensure_ascii=False)
    part1.write_text(line1 + line3[:30])
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={_free_port()}", "-m", "safeshape", "star", *common, "--out", str(out)]
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(safeshape.__file__)), os.environ.get("PYTHONPATH", "")]))  # the one imported here
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process STAR run did not finish in 240 s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    report = json.loads(r.stdout.strip().splitlines()[-1])
    assert report["world_size"] == 2 and report["rows_skipped"] == 1 and report["rows_scored"] == 5
    assert report["responses_per_s"] > 0 and report["guard_tokens_per_s"] > 0
    assert_same_rows(read_jsonl(out), single)
    assert sorted(p.name for p in tmp_path.iterdir() if ".part-" in p.name) == []  # parts merged and removed

    # OUT exists: a sharded run refuses it (no part is written), unless --overwrite
    cmd[4] = f"--master_port={_free_port()}"
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env)
    assert r.returncode != 0 and "safeshape star: error: rank 0: --out" in r.stderr, r.stderr[-3000:]
    assert "Traceback" not in r.stderr.split("safeshape star: error")[0]  # no Python traceback from the ranks
    assert not any(".part-" in p.name for p in tmp_path.iterdir())
