"""Launcher environments (docs: safeshape.distributed): torchrun and MPI variables give N processes;
`accelerate launch --cpu --num_processes 2`, which starts one process, is refused instead of training alone."""
import os
import socket
import subprocess
import sys

import pytest

from safeshape import testing
from safeshape.errors import SafeshapeError
from safeshape.distributed import launcher_ranks

ACCEL_SIMPLE = {"ACCELERATE_USE_CPU": "True", "ACCELERATE_MIXED_PRECISION": "no", "ACCELERATE_DYNAMO_BACKEND": "NO"}


@pytest.mark.parametrize("env,expected", [
    ({}, None),
    ({"WORLD_SIZE": "4", "RANK": "3", "LOCAL_RANK": "1"}, (3, 4, 1)),
    ({"OMPI_COMM_WORLD_SIZE": "2", "OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_LOCAL_RANK": "1"}, (1, 2, 1)),
    ({"PMI_SIZE": "8", "PMI_RANK": "5"}, (5, 8, 5)),
    (ACCEL_SIMPLE, None),  # accelerate launch --num_processes 1: a plain single process
    ({**ACCEL_SIMPLE, "WORLD_SIZE": "2", "RANK": "0", "LOCAL_RANK": "0", "MASTER_ADDR": "h"}, (0, 2, 0)),
])
def test_launcher_ranks(env, expected):
    assert launcher_ranks(env) == expected


def test_accelerate_single_process_asked_for_several_is_refused():
    with pytest.raises(SafeshapeError, match="accelerate launch started a single process.*torchrun --nproc_per_node"):
        launcher_ranks({**ACCEL_SIMPLE, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": "29500"})


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(**extra) -> dict:
    python_dir = os.path.dirname(os.path.dirname(testing.__file__))
    return dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=python_dir + os.pathsep + os.environ.get("PYTHONPATH", ""),
                **extra)


def test_real_accelerate_cpu_launch_is_refused_clearly(tmp_path):
    pytest.importorskip("accelerate")
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--cpu", "--num_processes", "2",
           "--main_process_port", str(_free_port()), "-m", "safeshape", "train", "--model", str(tmp_path / "m"),
           "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o"), "--no-progress"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=_env(), cwd=tmp_path)
    assert r.returncode != 0
    # our process exits 2 with one error line (the traceback after it is accelerate's own, reporting the exit)
    assert "safeshape train: error: accelerate launch started a single process" in r.stderr
    assert "returned non-zero exit status 2" in r.stderr
    assert "Traceback" not in r.stderr.split("safeshape train: error:")[0]
    assert not (tmp_path / "o").exists()


_MPI_RANK = """
from safeshape.distributed import setup
d = setup("cpu")
total = d.sum([d.rank + 1.0]).item()
print(d.rank, d.world_size, d.local_rank, total)
d.close()
"""


def test_mpi_environment_runs_as_n_processes():
    port = str(_free_port())
    procs = [subprocess.Popen([sys.executable, "-c", _MPI_RANK], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=_env(PMI_SIZE="2", PMI_RANK=str(r), MPI_LOCALRANKID=str(r),
                                                  MASTER_ADDR="127.0.0.1", MASTER_PORT=port))
             for r in range(2)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=120)
        assert p.returncode == 0, err[-2000:]
        outs.append(out.split())
    assert sorted(outs) == [["0", "2", "0", "3.0"], ["1", "2", "1", "3.0"]]
