"""Running `python -m safeshape ...` under torchrun in fresh interpreters (a fork of the test process could inherit a
live OpenMP pool from earlier tests and hang in the children), with a deadline."""
import json
import os
import socket
import subprocess
import sys

import pytest


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_torchrun(args: list[str], nproc: int = 2, timeout: int = 300) -> subprocess.CompletedProcess:
    """``torchrun --nproc_per_node=nproc -m safeshape *args`` on CPU, one thread a process; fails the test when it
    does not finish in ``timeout`` seconds or exits non-zero."""
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc_per_node={nproc}", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", "-m", "safeshape", *args]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the {nproc}-process run did not finish in {timeout} s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return r


def read_metrics(out) -> list[dict]:
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def assert_same_metrics(one: list[dict], two: list[dict]) -> None:
    """The metric lines of two runs of the same global batch agree (1e-5; the KL term, which starts near 0, 1e-4)."""
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        for key in ("loss", "sft_loss", "mean_weight", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["kl_loss"] == pytest.approx(a["kl_loss"], rel=1e-4, abs=1e-9)
