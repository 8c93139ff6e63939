"""`safeshape train` past one device (issue 21, failure 6): --fsdp shards the model with FSDP2 over 2 gloo processes and
gives the losses, gradient norms, adapter and checkpoints of 1 process on the same global batch; a sharded checkpoint
resumes exactly; accelerate's FSDP environment turns --fsdp on, and the configs it cannot run are refused; the base
loads in the checkpoint's dtype."""
import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from safeshape import testing
from safeshape.errors import SafeshapeError
from safeshape.trainer import TrainConfig, train
from safeshape.trainer.checkpoint import load_trainer_state
from safeshape.trainer.distributed import Dist, accelerate_fsdp

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_plan  # noqa: E402
from tests.torchrun_common import assert_same_metrics, read_metrics, run_torchrun


def _assert_same_adapter(a_dir, b_dir, rtol=1e-5, atol=1e-6):
    wa, wb = load_file(a_dir / "adapter_model.safetensors"), load_file(b_dir / "adapter_model.safetensors")
    assert wa.keys() == wb.keys()
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=rtol, atol=atol)


def test_fsdp_two_processes_equal_one_and_resume(tmp_path, monkeypatch):
    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp_path / "rows.jsonl", 10, "dss", seed=3)
    # 3 eval rows: the ranks hold 2 and 1, so the sharded eval pads one rank's batches to keep the collectives in step
    eval_data = testing.write_tiny_dataset(tmp_path / "eval.jsonl", 3, "dss", seed=4)
    single = train(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "one"), loss="dss", lr=5e-3,
                               lora_r=4, max_len=128, progress=False, seed=2, epochs=1, device="cpu", batch_size=4,
                               grad_accum=1, save_every=1, eval_data=str(eval_data)))
    args = ["train", "--model", str(model), "--data", str(data), "--loss", "dss", "--lr", "5e-3", "--lora-r", "4",
            "--max-len", "128", "--seed", "2", "--epochs", "1", "--batch-size", "1", "--grad-accum", "2",
            "--no-progress", "--device", "cpu", "--save-every", "1", "--eval-data", str(eval_data)]
    run_torchrun([*args, "--out", str(tmp_path / "two"), "--fsdp"])

    one, two = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert single["steps"] == 3 and len(one) == 3
    assert_same_metrics(one, two)
    assert one[-1]["kl_loss"] > 0  # the reference pass ran through the sharded model
    assert two[-1]["eval_loss"] == pytest.approx(one[-1]["eval_loss"], rel=1e-5)
    _assert_same_adapter(tmp_path / "one", tmp_path / "two")  # gathered from the shards
    _assert_same_adapter(tmp_path / "one" / "checkpoint-1", tmp_path / "two" / "checkpoint-1")

    # really sharded: rank 0 held about half of the base (every unit split over 2), against the whole in one process
    summary = json.loads((tmp_path / "two" / "train_summary.json").read_text())
    assert summary["sharding"] == "fsdp" and single["sharding"] == "none"
    assert summary["param_bytes"]["base"] <= 0.55 * single["param_bytes"]["base"]
    assert summary["param_bytes"]["trainable"] <= 0.55 * single["param_bytes"]["trainable"]
    cfg = json.loads((model / "config.json").read_text())  # and exactly what bench/memory_plan.py predicts
    want = memory_plan.param_bytes(cfg, "float32", world=2, r=4, targets=("q_proj", "v_proj"))
    assert summary["param_bytes"] == {"base": want["base"], "trainable": want["trainable"]}

    # the checkpoint holds full, unsharded optimizer moments: the layout of the one-process run
    sa, sb = load_trainer_state(tmp_path / "one" / "checkpoint-2"), load_trainer_state(tmp_path / "two" / "checkpoint-2")
    assert sa["optimizer"]["state"].keys() == sb["optimizer"]["state"].keys()
    for i, state in sa["optimizer"]["state"].items():
        for k, v in state.items():
            torch.testing.assert_close(sb["optimizer"]["state"][i][k], v, rtol=1e-4, atol=1e-9)

    # exact resume from the sharded checkpoint of step 1; this time --fsdp comes from accelerate's FSDP environment,
    # which also turns on activation checkpointing (the same numbers)
    resumed = tmp_path / "resumed"
    shutil.copytree(tmp_path / "two", resumed)
    for name in os.listdir(resumed):
        if name not in ("checkpoint-1", "metrics.jsonl"):
            (shutil.rmtree if (resumed / name).is_dir() else os.remove)(resumed / name)
    for var, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "FSDP_AUTO_WRAP_POLICY":
                       "TRANSFORMER_BASED_WRAP", "FSDP_TRANSFORMER_CLS_TO_WRAP": "LlamaDecoderLayer",
                       "FSDP_ACTIVATION_CHECKPOINTING": "true"}.items():
        monkeypatch.setenv(var, value)  # what `accelerate launch --use_fsdp ...` exports
    run_torchrun([*args, "--out", str(resumed), "--resume"])
    again = json.loads((resumed / "train_summary.json").read_text())
    assert again["resumed_from"] == 1 and again["sharding"] == "fsdp" and again["config"]["gradient_checkpointing"]
    assert [m["loss"] for m in read_metrics(resumed)] == pytest.approx([m["loss"] for m in two], rel=1e-6)
    _assert_same_adapter(tmp_path / "two", resumed, rtol=1e-6, atol=1e-8)


def test_accelerate_fsdp_environment_is_honoured_or_refused():
    assert accelerate_fsdp({}) is None
    assert accelerate_fsdp({"ACCELERATE_USE_FSDP": "false"}) is None
    launch = accelerate_fsdp({"ACCELERATE_USE_FSDP": "true", "FSDP_SHARDING_STRATEGY": "FULL_SHARD",
                              "FSDP_ACTIVATION_CHECKPOINTING": "true", "FSDP_TRANSFORMER_CLS_TO_WRAP": "A, B"})
    assert launch.activation_checkpointing and launch.layer_classes == ("A", "B")
    for env, named in [({"FSDP_SHARDING_STRATEGY": "SHARD_GRAD_OP"}, "FSDP_SHARDING_STRATEGY=SHARD_GRAD_OP"),
                       ({"FSDP_OFFLOAD_PARAMS": "true"}, "FSDP_OFFLOAD_PARAMS=true"),
                       ({"FSDP_AUTO_WRAP_POLICY": "SIZE_BASED_WRAP"}, "FSDP_AUTO_WRAP_POLICY=SIZE_BASED_WRAP"),
                       ({"FSDP_RESHARD_AFTER_FORWARD": "false"}, "FSDP_RESHARD_AFTER_FORWARD=false")]:
        with pytest.raises(SafeshapeError, match=named):
            accelerate_fsdp({"ACCELERATE_USE_FSDP": "true", **env})
    for var in ("ACCELERATE_USE_DEEPSPEED", "ACCELERATE_USE_MEGATRON_LM", "ACCELERATE_USE_PARALLELISM_CONFIG"):
        with pytest.raises(SafeshapeError, match=var):
            accelerate_fsdp({var: "true"})


def test_accelerate_deepspeed_config_is_refused_not_ignored(tmp_path, monkeypatch):
    """Failure 6: an accelerate config for another stack used to be ignored without a word."""
    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp_path / "rows.jsonl", 4, "sft")
    monkeypatch.setenv("ACCELERATE_USE_DEEPSPEED", "true")
    with pytest.raises(SafeshapeError, match="DeepSpeed"):
        train(TrainConfig(model=str(model), data=str(data), out=str(tmp_path / "o"), loss="sft", progress=False,
                          device="cpu", max_steps=1))


def test_base_loads_in_the_checkpoint_dtype(tmp_path):
    """Failure 6: weights loaded in float32 unless --bf16; --dtype auto (the default) keeps the checkpoint's."""
    from safeshape.trainer.loop import Run

    model_dir = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.bfloat16).save_pretrained(model_dir)
    data = testing.write_tiny_dataset(tmp_path / "rows.jsonl", 4, "sft")
    common = dict(model=str(model_dir), data=str(data), out=str(tmp_path / "o"), loss="sft", progress=False,
                  device="cpu")
    for kw, want in [({}, torch.bfloat16), ({"dtype": "float32"}, torch.float32), ({"bf16": True}, torch.bfloat16)]:
        run = Run(TrainConfig(**common, **kw), Dist())
        base = dict(run.peft_model.named_parameters())
        q = next(p for n, p in base.items() if n.endswith("q_proj.base_layer.weight"))
        lora = next(p for n, p in base.items() if "lora_A" in n)
        assert q.dtype == want and lora.dtype == torch.float32, kw
        assert run.lm_head_weight.dtype == want


def test_dtype_flags_are_checked():
    common = dict(model="m", data="d", out="o")
    with pytest.raises(SafeshapeError, match="--dtype"):
        TrainConfig(**common, dtype="fp8")
    with pytest.raises(SafeshapeError, match="--bf16.*--dtype float16"):
        TrainConfig(**common, bf16=True, dtype="float16")
    assert TrainConfig(**common, bf16=True).base_dtype == "bfloat16"
    assert TrainConfig(**common).base_dtype == "auto"
    with pytest.raises(SafeshapeError, match="exclude"):
        TrainConfig(**common, load_in_4bit=True, load_in_8bit=True)
    with pytest.raises(SafeshapeError, match="--fsdp"):
        TrainConfig(**common, fsdp=True, load_in_4bit=True)


def test_compile_gives_the_eager_run(tmp_path, monkeypatch):
    """--compile compiles each decoder layer (policy and reference passes, no graph break) and changes no number.
    aot_eager stands in for inductor here: the same dynamo capture and AOT autograd graphs, without minutes of C++
    code generation on CI's CPUs."""
    import functools

    import torch._dynamo.utils as dynamo_utils

    from safeshape.trainer.loop import Run

    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp_path / "rows.jsonl", 8, "dss", seed=3)
    common = dict(model=str(model), data=str(data), loss="dss", lr=5e-3, lora_r=4, max_len=96, progress=False,
                  seed=2, device="cpu", batch_size=4, max_steps=2)
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="aot_eager"))
    dynamo_utils.counters.clear()
    runs = {}
    for compiled in (True, False):
        run = Run(TrainConfig(out=str(tmp_path / str(compiled)), compile=compiled, **common), Dist())
        run.wrap_ddp()
        runs[compiled] = [run.train_step(step) for step in range(2)]
    assert dynamo_utils.counters["stats"]["unique_graphs"] >= 2  # the policy's layer and the adapter-disabled one
    assert not dynamo_utils.counters["graph_break"]
    for a, b in zip(runs[True], runs[False]):
        for key in ("loss", "kl_loss", "grad_norm"):
            assert a[key] == pytest.approx(b[key], rel=1e-5, abs=1e-9), key
    assert runs[True][1]["kl_loss"] > 0
