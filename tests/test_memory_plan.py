"""bench/memory_plan.py: its parameter arithmetic on a tiny config equals what a tiny run measures (the model's own
parameters, PEFT's LoRA weights, `Run.param_bytes`), and on the presets the published parameter counts."""
import json
import sys
from pathlib import Path

import pytest
import torch

from safeshape import testing
from safeshape.trainer import TrainConfig
from safeshape.trainer.distributed import Dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_plan  # noqa: E402


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("plan")
    model = testing.save_tiny_model(tmp / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp / "rows.jsonl", 4, "sft")
    return model, data, json.loads((model / "config.json").read_text())


def test_param_shapes_are_the_models(tiny):
    from transformers import AutoModelForCausalLM

    model_dir, _, cfg = tiny
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    assert {n: tuple(p.shape) for n, p in model.named_parameters()} == \
        {n: s for n, s, _ in memory_plan.param_shapes(cfg)}


def test_param_bytes_equal_a_measured_run(tiny, tmp_path):
    from safeshape.trainer.loop import Run

    model_dir, data, cfg = tiny
    run = Run(TrainConfig(model=str(model_dir), data=str(data), out=str(tmp_path / "o"), loss="sft", lora_r=4,
                          target_modules=("q_proj", "v_proj", "down_proj"), progress=False, device="cpu"), Dist())
    want = memory_plan.param_bytes(cfg, "float32", r=4, targets=("q_proj", "v_proj", "down_proj"))
    assert run.param_bytes() == {"base": want["base"], "trainable": want["trainable"]}


def test_presets_have_the_published_sizes(tmp_path):
    counts = {name: sum(memory_plan.numel(s) for _, s, _ in memory_plan.param_shapes(cfg))
              for name, cfg in memory_plan.PRESETS.items()}
    assert counts == {"llama-3-8b": 8_030_261_248, "llama-3-70b": 70_553_706_496}
    out = tmp_path / "plan.json"
    assert memory_plan.main(["--json", str(out)]) == 0
    plans = json.loads(out.read_text())["models"]["llama-3-70b"]["plans"]
    assert plans["bf16"]["params"] == 2 * counts["llama-3-70b"]
    assert plans["bf16_fsdp"]["params"] == pytest.approx(plans["bf16"]["params"] / 8, rel=1e-3)
    assert plans["bf16"]["total"] / memory_plan.GIB > 80 > plans["bf16_fsdp"]["total"] / memory_plan.GIB


def test_fsdp_shards_split_dim0_as_torch_chunk():
    for rows, world in [(7, 2), (3, 4), (8, 8), (1, 2)]:
        t = torch.arange(rows * 3).reshape(rows, 3)
        chunks = list(torch.chunk(t, world)) + [t[:0]] * world
        assert [memory_plan.shard_numel((rows, 3), world, r) for r in range(world)] == \
            [chunks[r].numel() for r in range(world)]
