"""QLoRA bases (issue 21, failure 6: there was no quantized base): --load-in-4bit / --load-in-8bit train a DSS step on
CPU through bitsandbytes, with the reference pass (adapter disabled) on the quantized base."""
import json
import sys
from pathlib import Path

import pytest
import torch

from safeshape import testing
from safeshape.trainer import TrainConfig
from safeshape.trainer.checkpoint import save_final_adapter
from safeshape.trainer.distributed import Dist
from safeshape.trainer.loop import Run
from safeshape.trainer.model import load_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "bench"))
import memory_plan  # noqa: E402


def _settings(model, data):
    return dict(model=str(model), data=str(data), loss="dss", lr=5e-2, lora_r=4, max_len=96, progress=False, seed=2,
                device="cpu", batch_size=4, max_steps=2)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """The tiny model, its rows, and the unquantized run's first-step loss."""
    tmp = tmp_path_factory.mktemp("quant")
    model = testing.save_tiny_model(tmp / "model", hidden_size=32, vocab_size=320)
    data = testing.write_tiny_dataset(tmp / "rows.jsonl", 8, "dss", seed=3)
    fp32 = Run(TrainConfig(out=str(tmp / "f"), **_settings(model, data)), Dist()).train_step(0)
    return model, data, fp32["loss"]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_base_trains_a_dss_step(files, tmp_path, bits):
    import bitsandbytes as bnb

    model, data, fp32_loss = files
    run = Run(TrainConfig(out=str(tmp_path / "q"), **{f"load_in_{bits}bit": True}, **_settings(model, data)), Dist())
    quantized = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    layers = {n: m for n, m in run.peft_model.named_modules() if isinstance(m, quantized)}
    assert any(n.endswith("q_proj.base_layer") for n in layers) and any(n.endswith("mlp.down_proj") for n in layers)
    assert run.lm_head_weight.dtype == torch.float32  # the head stays a float matrix for the fused loss
    cfg = json.loads((model / "config.json").read_text())  # bench/memory_plan.py's arithmetic, measured
    want = memory_plan.param_bytes(cfg, "float32", quantize=bits, r=4, targets=("q_proj", "v_proj"))
    assert run.param_bytes() == {"base": want["base"], "trainable": want["trainable"]}

    steps = [run.train_step(0), run.train_step(1)]
    assert all(torch.isfinite(torch.tensor(s["loss"])) for s in steps)
    assert steps[0]["grad_norm"] > 0 and steps[1]["kl_loss"] > 0  # LoRA moved the policy away from the reference

    # the reference pass is the quantized base itself: a fresh 4/8-bit load without LoRA gives the same hidden states
    batch = run.micro_batches(0)[0]
    with torch.no_grad():
        ref = run.policy(batch["input_ids"], batch["attention_mask"], reference=True)
        policy = run.policy(batch["input_ids"], batch["attention_mask"])
        base = load_model(str(model), "auto", torch.device("cpu"), quantize=bits).train()  # as the run (LLM.int8
        # computes differently in training mode)
        plain = base.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    torch.testing.assert_close(ref, plain)
    assert (policy - ref).abs().max() > 1e-4

    # and it stays near the unquantized model's loss (quantization error only)
    assert steps[0]["loss"] == pytest.approx(fp32_loss, rel=2e-2)

    # the adapter saves in PEFT layout (LoRA weights only, float32)
    (tmp_path / "adapter").mkdir()
    save_final_adapter(str(tmp_path / "adapter"), run.peft_model)
    from safetensors.torch import load_file

    weights = load_file(tmp_path / "adapter" / "adapter_model.safetensors")
    assert weights and all("lora_" in k and v.dtype == torch.float32 for k, v in weights.items())
