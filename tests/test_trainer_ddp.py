"""DDP on CPU (gloo): 2 processes give the losses and the adapter of 1 process with the same global batch."""
import json
import os
import socket
import time

import pytest
import torch
import torch.multiprocessing as mp
from safetensors.torch import load_file

from safeshape import testing
from safeshape.trainer import TrainConfig, train


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _worker(rank: int, world: int, port: int, config: dict) -> None:
    # the environment torchrun gives each process; train() joins the group itself
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    summary = train(TrainConfig(**config))
    assert summary["world_size"] == world and summary["rank"] == rank


def _metrics(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def test_two_processes_equal_one(tmp_path):
    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp_path / "rows.jsonl", 10, "dss", seed=3)
    common = dict(model=str(model), data=str(data), loss="dss", lr=5e-3, lora_r=4, max_len=128, progress=False,
                  seed=2, epochs=1)
    # global batch 4: one process 4 x 1 micro-batch, two processes 1 row x 2 micro-batches each. The last step
    # has 2 rows, so in its second micro-batch both processes have none (they still join the collectives).
    single = train(TrainConfig(out=str(tmp_path / "one"), batch_size=4, grad_accum=1, **common))
    config = dict(out=str(tmp_path / "two"), batch_size=1, grad_accum=2, **common)
    # fork: the children inherit the imported torch/transformers/peft (spawn re-imports them, ~10 s each here)
    ctx = mp.start_processes(_worker, args=(2, _free_port(), config), nprocs=2, join=False, start_method="fork")
    deadline = time.monotonic() + 180  # a hung collective fails the test instead of hanging the suite
    while not ctx.join(timeout=5):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process DDP run did not finish in 180 s")

    one, two = _metrics(tmp_path / "one"), _metrics(tmp_path / "two")
    assert single["steps"] == 3 and len(one) == len(two) == 3
    for a, b in zip(one, two):
        assert a["step"] == b["step"] and a["tokens"] == b["tokens"]
        for key in ("loss", "sft_loss", "mean_weight", "grad_norm", "lr"):
            assert b[key] == pytest.approx(a[key], rel=1e-5), key
        assert b["kl_loss"] == pytest.approx(a["kl_loss"], rel=1e-4, abs=1e-9)
    assert one[-1]["kl_loss"] > 0
    wa = load_file(tmp_path / "one" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
