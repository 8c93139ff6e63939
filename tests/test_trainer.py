"""The trainer on a tiny Llama (CPU): the loss it minimises is docs/math.md#dss-loss's, accumulation is exact, resume
is exact, outputs are PEFT-layout and atomic, bad input gives clear errors."""
import json
import os
import shutil

import pytest
import torch
from safetensors.torch import load_file

from safeshape import testing
from safeshape.data import IGNORE_INDEX, collate
from safeshape.errors import SafeshapeError
from safeshape.trainer import TrainConfig, train
from safeshape.trainer.distributed import Dist
from safeshape.trainer.loop import Run


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("trainer")
    model = testing.save_tiny_model(root / "model", hidden_size=32, vocab_size=320)
    return {"root": root, "model": str(model),
            "dss": str(testing.write_tiny_dataset(root / "dss.jsonl", 10, "dss", seed=5)),
            "rs": str(testing.write_tiny_dataset(root / "rs.jsonl", 8, "rs", seed=6)),
            "sft": str(testing.write_tiny_dataset(root / "sft.jsonl", 8, "sft", seed=7, messages=True))}


def _config(files, out, **kw):
    base = dict(model=files["model"], data=files["dss"], out=str(out), loss="dss", lr=5e-3, batch_size=4,
                lora_r=4, max_len=128, progress=False, seed=1, device="cpu")
    base.update(kw)
    return TrainConfig(**base)


def _spec_loss(run: Run, rows: list[int], kl_coef: float, betas=None) -> float:
    """docs/math.md#dss-loss (docs/math.md#deep-token with betas) in plain torch, through the model's own forward with full
    logits."""
    model = run.peft_model
    batch = collate([run.examples[i] for i in rows], run.pad_id)
    with torch.no_grad():
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
        with model.disable_adapter():
            ref_logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels, w = batch["labels"][:, 1:], batch["weights"][:, 1:]
    mask = labels != IGNORE_INDEX
    idx = labels.clamp(min=0).unsqueeze(-1)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, idx).squeeze(-1)
    lref = torch.log_softmax(ref_logits[:, :-1], -1).gather(-1, idx).squeeze(-1)
    if betas is None:
        per = w * (-lp) + kl_coef * (1 - w) * 0.5 * (lp - lref) ** 2
    else:  # position t counts the row's response tokens from 1; beta_t = betas[min(t, k) - 1]
        beta = torch.tensor(betas)[mask.long().cumsum(-1).clamp(1, len(betas)) - 1]
        per = (2 / beta) * -torch.nn.functional.logsigmoid(beta * (lp - lref))
    return float(per[mask].sum() / mask.sum())


def _adapter(path):
    return load_file(os.path.join(path, "adapter_model.safetensors"))


def _losses(out):
    with open(os.path.join(out, "metrics.jsonl")) as f:
        return [{k: v for k, v in json.loads(line).items() if k != "tokens_per_s"} for line in f]


@pytest.mark.parametrize("loss", ["dss", "rs", "sft", "deep-token"])
def test_step_loss_is_the_spec_loss(files, tmp_path, loss):
    betas = (0.3, 1.5, 1.5, 0.05)
    cfg = _config(files, tmp_path / "o", loss=loss, data=files["sft" if loss == "deep-token" else loss],
                  batch_size=8, kl_coef=0.7, deep_token_betas=",".join(map(str, betas)))
    run = Run(cfg, Dist())
    run.train_step(0)  # after one step LoRA B != 0, so the policy differs from the reference
    expected = _spec_loss(run, run.step_rows(1), 0.7 if loss == "dss" else 0.0,
                          betas if loss == "deep-token" else None)
    got = run.train_step(1)
    assert got["loss"] == pytest.approx(expected, rel=1e-5)
    assert got["loss"] == pytest.approx(got["sft_loss"] + got["kl_loss"], rel=1e-6)
    if loss == "dss":
        assert got["kl_loss"] > 0
    elif loss != "deep-token":
        assert got["kl_loss"] == 0


def test_rs_drops_rejected_rows_unless_asked(files, tmp_path):
    # RS as the authors run it: rows with safe=false are not trained on and N counts the kept rows' tokens only
    dropped = Run(_config(files, tmp_path / "a", loss="rs", data=files["rs"]), Dist())
    kept = Run(_config(files, tmp_path / "b", loss="rs", data=files["rs"], rs_keep_rejected=True), Dist())
    rejected = [e for e in kept.examples if not any(w > 0 for w in e.weights)]
    assert rejected and dropped.rejected == len(rejected) and kept.rejected == 0
    assert len(dropped.examples) == len(kept.examples) - len(rejected)
    assert all(any(w > 0 for w in e.weights) for e in dropped.examples)
    # the old behaviour: the same summed loss over more tokens, so a smaller loss per step
    a, b = dropped.train_step(0), kept.train_step(0)
    assert a["mean_weight"] == 1.0 and b["mean_weight"] < 1.0


def test_accumulation_equals_one_batch(files, tmp_path):
    """k micro-batches of the same rows give the same losses and the same update as one batch. 10 rows in steps
    of 8: the second step has 2 rows, so with 4 micro-batches of 2 three of them are empty."""
    results = []
    for batch_size, accum in [(8, 1), (4, 2), (2, 4)]:
        run = Run(_config(files, tmp_path / "o", batch_size=batch_size, grad_accum=accum), Dist())
        assert run.global_batch == 8 and run.steps_per_epoch == 2
        metrics = [run.train_step(s) for s in range(3)]
        weights = {k: v.detach().clone() for k, v in run.peft_model.named_parameters() if v.requires_grad}
        results.append((run, metrics, weights))
    run8, m8, w8 = results[0]
    for run, m, w in results[1:]:
        assert [run.step_rows(s) for s in range(3)] == [run8.step_rows(s) for s in range(3)]
        for a, b in zip(m8, m):
            assert a["tokens"] == b["tokens"]
            assert a["loss"] == pytest.approx(b["loss"], rel=1e-6)
            assert a["kl_loss"] == pytest.approx(b["kl_loss"], rel=1e-5, abs=1e-9)
            assert a["mean_weight"] == pytest.approx(b["mean_weight"], rel=1e-6)
            assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-5)
        for k in w8:
            torch.testing.assert_close(w[k], w8[k], rtol=1e-5, atol=1e-6)


def test_resume_extends_a_finished_run(files, tmp_path):
    """--resume with a larger --max-steps continues a finished run; with a constant schedule, 3 + 2 steps equal 5
    steps run at once. A smaller one is refused."""
    cfg = dict(batch_size=2, max_steps=5, schedule="constant", lora_dropout=0.0)
    full = train(_config(files, tmp_path / "full", **cfg))
    short = train(_config(files, tmp_path / "ext", **{**cfg, "max_steps": 3}))
    assert short["steps"] == 3
    extended = train(_config(files, tmp_path / "ext", resume=True, **cfg))
    assert extended["resumed_from"] == 3 and extended["steps"] == full["steps"] == 5
    assert _losses(tmp_path / "ext") == _losses(tmp_path / "full")
    a, b = _adapter(tmp_path / "full"), _adapter(tmp_path / "ext")
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    with pytest.raises(SafeshapeError, match=r"it is at step 5, past this run's 4 steps"):
        train(_config(files, tmp_path / "ext", resume=True, **{**cfg, "max_steps": 4}))


def test_resume_equals_uninterrupted(files, tmp_path):
    full = tmp_path / "full"
    cfg = dict(batch_size=2, grad_accum=2, max_steps=5, save_every=2, warmup_steps=1, lora_dropout=0.1)
    summary = train(_config(files, full, **cfg))
    assert summary["steps"] == 5
    assert sorted(p for p in os.listdir(full) if p.startswith("checkpoint-")) == [
        "checkpoint-2", "checkpoint-4", "checkpoint-5"]
    # a crash after step 3: checkpoint-2 survives, a torn metrics line, a half-written checkpoint folder
    crashed = tmp_path / "crashed"
    crashed.mkdir()
    shutil.copytree(full / "checkpoint-2", crashed / "checkpoint-2")
    lines = (full / "metrics.jsonl").read_text().splitlines(keepends=True)
    (crashed / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][:10])
    (crashed / ".tmp-checkpoint-4.999").mkdir()
    with pytest.raises(SafeshapeError, match="exists and is not empty; pass --resume"):
        train(_config(files, crashed, **cfg))
    resumed = train(_config(files, crashed, resume=True, **cfg))
    assert resumed["resumed_from"] == 2 and resumed["steps"] == 5
    assert _losses(crashed) == _losses(full)
    for name in ("checkpoint-5", "."):
        a, b = _adapter(full / name), _adapter(crashed / name)
        assert a.keys() == b.keys()
        for k in a:
            torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-7)
    assert not [p for p in os.listdir(crashed) if p.startswith(".tmp")]
    # a changed hyper-parameter cannot silently continue another run
    with pytest.raises(SafeshapeError, match=r"--lr was 0.005 in that run, now 0.001"):
        train(_config(files, crashed, resume=True, **{**cfg, "max_steps": 6}, **{"lr": 1e-3}))


def test_outputs_are_peft_layout(files, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = tmp_path / "o"
    summary = train(_config(files, out, loss="sft", data=files["sft"], max_steps=2))
    for name in ("adapter_config.json", "adapter_model.safetensors", "metrics.jsonl", "train_summary.json",
                 "checkpoint-2/trainer_state.safetensors", "checkpoint-2/adapter_model.safetensors"):
        assert (out / name).is_file(), name
    keys = list(_adapter(out))
    assert keys and all(k.startswith("base_model.model.") and (".lora_A." in k or ".lora_B." in k) for k in keys)
    assert {k.split(".")[-3] for k in keys} == {"q_proj", "v_proj"}
    lines = _losses(out)
    assert [m["step"] for m in lines] == [1, 2]
    assert set(lines[0]) >= {"loss", "sft_loss", "kl_loss", "mean_weight", "lr", "tokens"}
    assert summary["final_loss"] == lines[-1]["loss"]
    # the adapter loads back with PEFT and changes the model
    base = AutoModelForCausalLM.from_pretrained(files["model"])
    model = PeftModel.from_pretrained(base, str(out))
    assert any(float(p.abs().sum()) > 0 for n, p in model.named_parameters() if "lora_B" in n)


def test_existing_out_is_refused_unless_overwrite(files, tmp_path):
    out = tmp_path / "o"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    with pytest.raises(SafeshapeError, match=r"--out .*exists and is not empty"):
        train(_config(files, out, max_steps=1))
    assert (out / "keep.txt").exists()
    # --overwrite replaces only a run folder of ours (safeshape.io's manifest): never someone's files
    with pytest.raises(SafeshapeError, match=r"--overwrite replaces only an output folder safeshape wrote"):
        train(_config(files, out, max_steps=1, overwrite=True))
    assert sorted(os.listdir(out)) == ["keep.txt"]
    (out / "keep.txt").unlink()
    train(_config(files, out, max_steps=1, overwrite=True))  # an empty folder
    (out / "extra.txt").write_text("written into our run folder")
    train(_config(files, out, max_steps=1, overwrite=True))  # our own run folder is replaced
    assert not (out / "extra.txt").exists() and (out / "adapter_model.safetensors").exists()
    with pytest.raises(SafeshapeError, match="overlaps the input --model"):
        train(_config(files, files["model"], max_steps=1, overwrite=True))
    holder = tmp_path / "holder"
    holder.mkdir()
    data = shutil.copy(files["dss"], holder / "rows.jsonl")
    with pytest.raises(SafeshapeError, match="overlaps the input --data"):
        train(_config(files, holder, data=str(data), max_steps=1, overwrite=True))
    assert os.path.isfile(data)
    with pytest.raises(SafeshapeError, match="overlaps the input --model"):
        train(_config(files, os.path.join(files["model"], "adapter"), max_steps=1))


@pytest.mark.parametrize("targets, message", [
    (("query", "value"), r"--target-modules query,value: matches no Linear layer of the model; its Linear layers "
                         r"are named \['down_proj', 'gate_proj', 'k_proj', 'lm_head', 'o_proj', 'q_proj', 'up_proj', "
                         r"'v_proj'\]"),
    (("q_proj", "lm_head"), "`lm_head` is the output head"),
])
def test_target_modules_errors(files, tmp_path, targets, message):
    with pytest.raises(SafeshapeError, match=message):
        train(_config(files, tmp_path / "o", target_modules=targets, max_steps=1))


def test_dss_without_star_fields_is_refused(files, tmp_path):
    with pytest.raises(SafeshapeError, match=r"sft.jsonl line 1: --loss dss needs STAR fields"):
        train(_config(files, tmp_path / "o", data=files["sft"], max_steps=1))
    assert not (tmp_path / "o").exists()


def test_config_validation():
    with pytest.raises(SafeshapeError, match="--loss: must be one of dss, sft, rs"):
        TrainConfig(model="m", data="d", out="o", loss="dpo")
    with pytest.raises(SafeshapeError, match="--grad-accum: must be a positive integer"):
        TrainConfig(model="m", data="d", out="o", grad_accum=0)
    assert TrainConfig(model="m", data="d", out="o", target_modules="q_proj, k_proj").target_modules == (
        "q_proj", "k_proj")
    assert TrainConfig(model="m", data="d", out="o", deep_token_betas="0.5,2,0.1").deep_token_betas == (0.5, 2, 0.1)
    with pytest.raises(SafeshapeError, match="--deep-token-betas: must be positive numbers"):
        TrainConfig(model="m", data="d", out="o", deep_token_betas="0.5,0")
    with pytest.raises(SafeshapeError, match="--deep-token-betas: must be comma-separated numbers"):
        TrainConfig(model="m", data="d", out="o", deep_token_betas="half")


def test_cli(files, tmp_path, capsys):
    from safeshape import cli

    out = tmp_path / "o"
    argv = ["train", "--model", files["model"], "--data", files["rs"], "--out", str(out), "--loss", "rs",
            "--batch-size", "4", "--max-steps", "1", "--target-modules", "q_proj,k_proj", "--no-progress", "--json",
            "--lora-r", "2", "--device", "cpu"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and summary["out"] == str(out)
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["r"] == 2 and sorted(config["target_modules"]) == ["k_proj", "q_proj"]
    assert cli.main(argv) == 2  # out exists now
    assert "exists and is not empty" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli.main(argv[:-2] + ["--loss", "dpo"])


def test_cli_deep_token(files, tmp_path, capsys):
    from safeshape import cli

    out = tmp_path / "o"
    argv = ["train", "--model", files["model"], "--data", files["sft"], "--out", str(out), "--loss", "deep-token",
            "--deep-token-betas", "0.5,2,0.1", "--batch-size", "4", "--max-steps", "1", "--no-progress", "--json"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary["steps"] == 1 and json.loads((out / "train_summary.json").read_text())["config"][
        "deep_token_betas"] == [0.5, 2.0, 0.1]
    assert cli.main(argv[:-4] + ["--deep-token-betas", "x", "--no-progress", "--overwrite"]) == 2
    assert "--deep-token-betas: must be comma-separated numbers" in capsys.readouterr().err


def test_bf16_base_keeps_float32_adapter(files, tmp_path):
    run = Run(_config(files, tmp_path / "o", bf16=True, batch_size=8), Dist())
    m = [run.train_step(s) for s in range(2)]
    assert all(p.dtype == torch.float32 for p in run.params)
    assert run.lm_head_weight.dtype == torch.bfloat16
    assert all(torch.isfinite(torch.tensor(x["loss"])) for x in m) and m[1]["kl_loss"] > 0


def test_rows_annotated_by_safeshape_star_train(files, tmp_path):
    """The whole pipeline's hand-off: `safeshape star` output rows are valid --loss dss input."""
    from safeshape.star import annotate_file
    from safeshape.star.tiny import build_tiny_guard

    guard, guard_tok = build_tiny_guard(hidden=32, vocab_size=512)
    annotated = tmp_path / "annotated.jsonl"
    annotate_file(guard, guard_tok, files["sft"], annotated, "llama-guard-3", chunk_words=3, progress=False)
    rows = [json.loads(line) for line in annotated.read_text().splitlines()]
    assert all(r["star_chunk_words"] == 3 and r["star_values"] for r in rows)
    run = Run(_config(files, tmp_path / "o", data=str(annotated), batch_size=8, max_len=512), Dist())
    for ex in run.examples:
        values = rows[ex.line - 1]["star_values"]
        w = [x for x, t in zip(ex.weights, ex.labels) if t != IGNORE_INDEX]
        assert w[0] == pytest.approx(values[0]) and w[-1] == pytest.approx(values[-1])
        assert all(any(x == pytest.approx(v) for v in values) for x in w)
    m = run.train_step(0)
    assert 0 < m["mean_weight"] < 1 and m["tokens"] > 0 and m["kl_loss"] == 0  # B = 0: policy == reference


def test_resume_refuses_a_setting_newer_than_the_checkpoint(tmp_path):
    """A checkpoint written before a setting existed (here --dss-kl-clamp) ran with that setting's default: resuming
    it with another value would silently change the loss mid-run."""
    import json
    from dataclasses import asdict

    from safeshape.trainer.checkpoint import STATE_JSON, check_resumable
    from safeshape.trainer.config import TrainConfig

    cfg = TrainConfig(model="m", data="d.jsonl", out=str(tmp_path / "o"), loss="dss")
    saved = asdict(cfg)
    saved.pop("dss_kl_clamp")
    saved = json.loads(json.dumps(saved))
    ckpt = tmp_path / "checkpoint-2"
    ckpt.mkdir()
    (ckpt / STATE_JSON).write_text(json.dumps({"config": saved, "data_sha256": "x", "world_size": 1}))
    check_resumable(str(ckpt), cfg, "x", 1)  # the default: the same computation
    clamped = TrainConfig(model="m", data="d.jsonl", out=str(tmp_path / "o"), loss="dss", dss_kl_clamp=10.0)
    with pytest.raises(SafeshapeError, match=r"before --dss-kl-clamp existed and ran with its default None, now 10.0"):
        check_resumable(str(ckpt), clamped, "x", 1)
