"""Issue 24: an error of any type on one process of a multi-process eval or star run reaches every process, so
none is left waiting in a collective (before, only SafeshapeError was shared and anything else hung the others in
gather_objects). Two gloo processes on CPU; each reports what it raised, the test waits for both to exit (the
join limit only turns a hang into a failure instead of a stuck suite)."""
import json
import os
import socket
import sys
import traceback
from argparse import Namespace

import pytest

HANG_GUARD_S = 300


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _outcome(fn) -> str:
    try:
        return f"returned {fn()!r}"
    except Exception as exc:  # noqa: BLE001 -- what each process raised is the result
        return f"raised {type(exc).__name__}: {exc}"


def _child(rank: int, port: int, folder: str) -> None:
    os.environ.update(WORLD_SIZE="2", RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port), OMP_NUM_THREADS="1")
    results = {}
    try:
        import safeshape.star.cli as star_cli
        from safeshape.distributed import on_main, setup
        from safeshape.eval.generate import sharded_map

        dist = setup("cpu")

        def boom_on_0():
            raise RuntimeError("disk on fire")

        results["on_main"] = _outcome(lambda: on_main(dist, boom_on_0))

        def work(j):
            if j == 1:  # batch 1 runs on process 1
                raise KeyError("no such token")
            return [j]

        results["eval sharded_map"] = _outcome(lambda: sharded_map(4, work, dist))

        def annotate(args, preset, guard_date, device, out, shard, progress):
            if shard[0] == 1:
                raise ValueError("guard returned garbage")
            return None

        star_cli._annotate = annotate
        args = Namespace(out=os.path.join(folder, "o.jsonl"), overwrite=False, data=os.path.join(folder, "in.jsonl"),
                         no_progress=True, device="cpu", json=False, report=None, guard="g")
        results["star sharded"] = _outcome(lambda: star_cli._main_sharded(args, None, None))
    except BaseException:  # noqa: BLE001
        results["setup"] = traceback.format_exc()
    with open(os.path.join(folder, f"rank{rank}.json"), "w") as f:
        json.dump(results, f)
    sys.stdout.flush()


@pytest.mark.skipif(sys.platform != "linux", reason="gloo on Linux")
def test_an_error_of_any_type_on_one_rank_reaches_every_rank(tmp_path):
    import torch.multiprocessing as mp

    (tmp_path / "in.jsonl").write_text('{"prompt": "a", "response": "b c"}\n' * 4)
    ctx = mp.get_context("spawn")
    port = _free_port()
    procs = [ctx.Process(target=_child, args=(r, port, str(tmp_path))) for r in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(HANG_GUARD_S)
    hung = [p.pid for p in procs if p.is_alive()]
    for p in procs:
        if p.is_alive():
            p.kill()
            p.join()
    assert not hung, "a process was left waiting in a collective"
    got = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert "setup" not in got[0] and "setup" not in got[1], got
    # process 0's own error on process 0, a SafeshapeError saying so on the other
    assert got[0]["on_main"] == "raised RuntimeError: disk on fire"
    assert got[1]["on_main"].startswith("raised SafeshapeError: process 0 failed")
    for g in got:
        assert g["eval sharded_map"] == "raised SafeshapeError: process 1: KeyError: 'no such token'"
        assert g["star sharded"] == "returned 2"
