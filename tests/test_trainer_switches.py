"""Training switches: --target-modules all-linear, --gradient-checkpointing, --mixed-precision bf16 (autocast,
distinct from --bf16 weights), --device auto, --config FILE (JSON or YAML)."""
import json

import pytest
import torch
from torch import nn

from safeshape import cli, testing
from safeshape.errors import SafeshapeError
from safeshape.trainer import TrainConfig
from safeshape.trainer.distributed import Dist, resolve_device
from safeshape.trainer.loop import Run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("switches")
    return {"root": root, "model": str(testing.save_tiny_model(root / "model", hidden_size=32, vocab_size=320)),
            "dss": str(testing.write_tiny_dataset(root / "dss.jsonl", 8, "dss", seed=5)),
            "sft": str(testing.write_tiny_dataset(root / "sft.jsonl", 8, "sft", seed=7))}


def _run(files, tmp_path, **kw) -> Run:
    base = dict(model=files["model"], data=files["sft"], out=str(tmp_path / "o"), loss="sft", lr=5e-3, batch_size=4,
                lora_r=4, max_len=96, progress=False, seed=1, device="cpu")
    base.update(kw)
    return Run(TrainConfig(**base), Dist())


def _layers(run):
    return run.peft_model.get_base_model().model.layers


def test_all_linear_adapts_every_linear_but_the_head(files, tmp_path):
    run = _run(files, tmp_path, target_modules="all-linear")
    adapted = {name.rsplit(".", 1)[-1] for name, m in run.peft_model.named_modules() if hasattr(m, "lora_A")}
    assert adapted == {"q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"}
    assert not hasattr(run.peft_model.get_base_model().lm_head, "lora_A")
    with pytest.raises(SafeshapeError, match="all-linear stands alone"):
        TrainConfig(model="m", data="d", out="o", target_modules="all-linear,q_proj")


def _count_layer_calls(run) -> list[int]:
    # a pre-hook on a submodule: transformers checkpoints a layer's forward (the layer's own hooks run once), and
    # torch stops the recomputation once the saved tensors are back (a post-hook at the end may never run)
    calls = [0]
    _layers(run)[0].self_attn.register_forward_pre_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_gradient_checkpointing_recomputes_and_changes_nothing(files, tmp_path):
    plain = _run(files, tmp_path)
    ckpt = _run(files, tmp_path, gradient_checkpointing=True)
    calls_plain, calls_ckpt = _count_layer_calls(plain), _count_layer_calls(ckpt)
    a, b = plain.train_step(0), ckpt.train_step(0)
    assert calls_plain[0] == 1 and calls_ckpt[0] == 2  # the layer ran again in backward
    assert b["loss"] == pytest.approx(a["loss"], rel=1e-6)
    assert b["grad_norm"] == pytest.approx(a["grad_norm"], rel=1e-5)


def test_mixed_precision_autocasts_without_changing_weight_dtypes(files, tmp_path):
    full = _run(files, tmp_path, loss="dss", data=files["dss"])
    mixed = _run(files, tmp_path, loss="dss", data=files["dss"], mixed_precision="bf16")
    seen = []
    q = _layers(mixed)[0].self_attn.q_proj.base_layer
    q.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    a, b = full.train_step(0), mixed.train_step(0)
    assert seen and set(seen) == {torch.bfloat16}  # reference and policy passes both ran under autocast
    assert q.weight.dtype == torch.float32  # weights keep the dtype they were loaded in (unlike --bf16)
    assert all(p.dtype == torch.float32 for p in mixed.params)
    assert b["loss"] == pytest.approx(a["loss"], rel=0.05) and b["loss"] != a["loss"]


def test_device_auto(monkeypatch):
    assert TrainConfig(model="m", data="d", out="o").device == "auto"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device("auto") == "cpu"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    assert resolve_device("auto") == "cuda" and resolve_device("cpu") == "cpu"
    with pytest.raises(SafeshapeError, match="--device"):
        TrainConfig(model="m", data="d", out="o", device="gpu")


@pytest.mark.parametrize("suffix", [".json", ".yaml"])
def test_config_file_with_command_line_override(files, tmp_path, capsys, suffix):
    settings = {"model": files["model"], "data": files["sft"], "out": str(tmp_path / "o"), "loss": "sft",
                "lora-r": 2, "lr": "1e-3", "max_steps": 1, "batch_size": 4, "max_len": 64, "progress": False,
                "target_modules": ["q_proj", "k_proj"], "device": "cpu"}
    path = tmp_path / f"train{suffix}"
    if suffix == ".json":
        path.write_text(json.dumps(settings))
    else:
        yaml = pytest.importorskip("yaml")
        path.write_text(yaml.safe_dump(settings))
    assert cli.main(["train", "--config", str(path), "--lora-r", "3", "--json"]) == 0
    summary = json.loads((tmp_path / "o" / "train_summary.json").read_text())["config"]
    assert summary["lora_r"] == 3  # the flag wins over the file
    assert summary["lr"] == 1e-3 and summary["loss"] == "sft" and summary["target_modules"] == ["q_proj", "k_proj"]
    capsys.readouterr()


@pytest.mark.parametrize("text,name,message", [
    ('{"model": "m", "lora_rank": 2}', "c.json", "unknown key 'lora_rank'"),
    ('{"lr": "fast"}', "c.json", "lr: 'fast' is not a number"),
    ("[1, 2]", "c.json", "must hold a mapping"),
    ("{", "c.json", "cannot read it"),
    ("model: [", "c.yaml", "not valid YAML"),
    ("model: m", "c.toml", "name a .json, .yaml or .yml file"),
    ('{"model": "m"}', "c.json", "--data, --out required"),
])
def test_bad_config_files_are_clear_errors(tmp_path, capsys, text, name, message):
    path = tmp_path / name
    path.write_text(text)
    assert cli.main(["train", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert ("YAML" in err) == name.endswith(".yaml")


def test_required_flags_without_config(capsys):
    assert cli.main(["train", "--data", "d.jsonl"]) == 2
    assert "--model, --out required" in capsys.readouterr().err


def test_eval_loss_is_the_plain_loss_of_the_saved_adapter(files, tmp_path, capsys):
    """eval_loss after the last step = mean cross-entropy over the eval rows' response tokens, recomputed here with
    PEFT's loader and the model's own logits (sft: weights 1, no KL)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from safeshape.data import IGNORE_INDEX, collate, load_examples

    held_out = testing.write_tiny_dataset(tmp_path / "eval.jsonl", 5, "sft", seed=11)
    out = tmp_path / "o"
    assert cli.main(["train", "--model", files["model"], "--data", files["sft"], "--eval-data", str(held_out),
                     "--eval-every", "1", "--out", str(out), "--loss", "sft", "--max-steps", "2", "--batch-size", "4",
                     "--lora-r", "2", "--lr", "1e-2", "--max-len", "96", "--no-progress", "--device", "cpu"]) == 0
    assert "eval loss" in capsys.readouterr().out
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [("eval_loss" in m) for m in lines] == [True, True]
    tokenizer = AutoTokenizer.from_pretrained(files["model"])
    model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(files["model"]), str(out)).eval()
    examples, _ = load_examples(held_out, tokenizer, "sft", 96)
    batch = collate(examples, tokenizer.pad_token_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(),
                                           ignore_index=IGNORE_INDEX)
    assert lines[-1]["eval_loss"] == pytest.approx(float(expected), rel=1e-5)
    assert lines[-1]["eval_tokens"] == int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
    assert lines[0]["eval_loss"] != lines[1]["eval_loss"]
    assert json.loads((out / "train_summary.json").read_text())["eval_loss"] == lines[-1]["eval_loss"]


def _train_reporting(files, out, kind):
    assert cli.main(["train", "--model", files["model"], "--data", files["sft"], "--out", str(out), "--loss", "sft",
                     "--max-steps", "2", "--batch-size", "4", "--lora-r", "2", "--max-len", "64", "--no-progress",
                     "--device", "cpu", "--report-to", kind]) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_report_to_tensorboard(files, tmp_path, capsys):
    pytest.importorskip("tensorboard")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    lines = _train_reporting(files, tmp_path / "o", "tensorboard")
    events = EventAccumulator(str(tmp_path / "o" / "runs"))
    events.Reload()
    logged = events.Scalars("train/loss")
    assert [e.step for e in logged] == [1, 2]
    assert [e.value for e in logged] == pytest.approx([m["loss"] for m in lines], rel=1e-6)
    assert "train/grad_norm" in events.Tags()["scalars"]
    capsys.readouterr()


def test_report_to_wandb_offline(files, tmp_path, monkeypatch, capsys):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    lines = _train_reporting(files, tmp_path / "o", "wandb")
    runs = list((tmp_path / "o" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1
    # wandb 0.2x+ has no Python reader of its run log; its history records hold the values as JSON text
    record = runs[0].read_bytes()
    assert b"train/loss" in record and b"train/grad_norm" in record
    assert all(json.dumps(m["loss"]).encode() in record for m in lines)
    capsys.readouterr()


def test_report_to_is_checked():
    with pytest.raises(SafeshapeError, match="--report-to"):
        TrainConfig(model="m", data="d", out="o", report_to="mlflow")


@pytest.mark.parametrize("schedule,warmup", [("linear", 0), ("linear", 2), ("constant", 3)])
def test_lr_schedule_is_transformers(schedule, warmup):
    """The trainer's schedule is transformers.get_scheduler's (what Trainer does), written out here."""
    from safeshape.trainer.loop import lr_scheduler

    total, lr = 8, 0.1
    opt = torch.optim.SGD([nn.Parameter(torch.zeros(1))], lr=lr)
    sched = lr_scheduler(TrainConfig(model="m", data="d", out="o", schedule=schedule, warmup_steps=warmup), opt, total)
    got = []
    for _ in range(total):
        got.append(sched.get_last_lr()[0])
        opt.step()
        sched.step()
    want = [lr * (s / warmup if s < warmup else 1.0 if schedule == "constant" else (total - s) / (total - warmup))
            for s in range(total)]
    assert got == pytest.approx(want)
