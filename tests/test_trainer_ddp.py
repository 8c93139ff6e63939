"""DDP on CPU (gloo): 2 processes give the losses and the adapter of 1 process with the same global batch."""
import json

import torch
from safetensors.torch import load_file

from safeshape import testing
from safeshape.trainer import TrainConfig, train

from tests.torchrun_common import assert_same_metrics, read_metrics, run_torchrun


def test_two_processes_equal_one(tmp_path):
    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp_path / "rows.jsonl", 10, "dss", seed=3)
    common = dict(model=str(model), data=str(data), loss="dss", lr=5e-3, lora_r=4, max_len=128, progress=False,
                  seed=2, epochs=1, device="cpu")
    # global batch 4: one process 4 x 1 micro-batch, two processes 1 row x 2 micro-batches each. The last step
    # has 2 rows, so in its second micro-batch both processes have none (they still join the collectives).
    single = train(TrainConfig(out=str(tmp_path / "one"), batch_size=4, grad_accum=1, **common))
    # the real entry point, in fresh interpreters: torchrun -> `safeshape train`
    run_torchrun(["train", "--model", str(model), "--data", str(data), "--out", str(tmp_path / "two"), "--loss", "dss",
                  "--lr", "5e-3", "--lora-r", "4", "--max-len", "128", "--seed", "2", "--epochs", "1",
                  "--batch-size", "1", "--grad-accum", "2", "--no-progress", "--device", "cpu"])

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert single["steps"] == 3 and len(one) == 3
    assert_same_metrics(one, two)
    assert one[-1]["kl_loss"] > 0
    wa = load_file(tmp_path / "one" / "adapter_model.safetensors")
    wb = load_file(tmp_path / "two" / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-5, atol=1e-6)
    state = json.loads((tmp_path / "two" / "checkpoint-3" / "trainer_state.json").read_text())
    assert state["world_size"] == 2
