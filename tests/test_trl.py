"""The TRL recipe: trl.SFTTrainer with safeshape.hf's DSS loss. Its logged entropy and token accuracy are those of
a plain SFTTrainer on the same model and batch (TRL's own fused head computes them; our hooks stay out of its
way), the prepared model still runs plain forwards, and its hooks come off."""
import pytest
import torch

from safeshape import hf, testing

trl = pytest.importorskip("trl")
datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny models are bound by per-op overhead: on a loaded 2-core machine two OpenMP threads made the setup
    40x slower than one (bench/NOTES.md, the demo's finding)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def setup(tmp_path_factory, one_thread):
    """A tiny Llama that has memorised its rows (so token accuracy is far from 0) and those rows, DSS-encoded."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    root = tmp_path_factory.mktemp("trl")
    path = testing.save_tiny_model(root / "model", hidden_size=32, vocab_size=320)
    tok = AutoTokenizer.from_pretrained(path)
    rows = hf.encode_rows(testing.write_tiny_dataset(root / "rows.jsonl", 8, "dss", seed=5), tok, loss="dss",
                          max_len=96)
    model = AutoModelForCausalLM.from_pretrained(path)
    batch = hf.DSSDataCollator(tok)(rows)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-2)
    torch.manual_seed(0)
    for _ in range(60):
        out = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(root / "memorised")
    tok.save_pretrained(root / "memorised")
    return root, root / "memorised", tok, rows


def _train(setup, dss: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    root, path, tok, rows = setup
    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    collator = hf.DSSDataCollator(tok)
    if dss:
        model = hf.prepare_model(model, kl_coef=0.5)
        loss_func = hf.compute_loss
    else:  # plain SFTTrainer (its own loss), the same batches without the STAR column
        loss_func, dss_collator = None, collator
        collator = lambda features: {k: v for k, v in dss_collator(features).items() if k != "star_weights"}  # noqa
    args = trl.SFTConfig(output_dir=str(root / f"out-{dss}"), max_steps=2, per_device_train_batch_size=8,
                         learning_rate=1e-3, logging_steps=1, report_to=[], remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=True, save_strategy="no", seed=0,
                         disable_tqdm=True)
    trainer = trl.SFTTrainer(model=model, args=args, train_dataset=datasets.Dataset.from_list(rows),
                             data_collator=collator, compute_loss_func=loss_func, processing_class=tok)
    trainer.train()
    return model, [h for h in trainer.state.log_history if "loss" in h]


def test_sft_trainer_with_dss_logs_the_metrics_of_plain_sft(setup):
    _, plain = _train(setup, dss=False)
    model, dss = _train(setup, dss=True)
    first_plain, first_dss = plain[0], dss[0]  # step 1: same model, same batch, before any update
    assert first_plain["mean_token_accuracy"] > 0.5
    assert first_dss["mean_token_accuracy"] == pytest.approx(first_plain["mean_token_accuracy"])
    assert first_dss["entropy"] == pytest.approx(first_plain["entropy"], rel=1e-5)
    assert first_dss["loss"] != pytest.approx(first_plain["loss"])  # a different objective did run

    # the prepared model still runs a plain forward (no star_weights), with full logits
    ids = torch.tensor([[1, 5, 6, 7]])
    logits = model(input_ids=ids).logits
    assert logits.shape[:2] == (1, 4)
    hf.unprepare_model(model)
    torch.testing.assert_close(model(input_ids=ids).logits, logits)
    assert not model._forward_pre_hooks and not model._forward_hooks


def test_metrics_forward_skips_the_reference_pass(setup, monkeypatch):
    """TRL's second, no-grad forward (fused_lm_head=True) is for metrics: no reference pass for it."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    _, path, tok, rows = setup
    model = hf.prepare_model(get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                                            LoraConfig(r=2, target_modules=["q_proj"], task_type="CAUSAL_LM")))
    calls = []
    original = type(model).disable_adapter
    monkeypatch.setattr(type(model), "disable_adapter", lambda self: (calls.append(1), original(self))[1])
    batch = {k: v for k, v in hf.DSSDataCollator(tok)(rows[:2]).items() if k != "labels"}
    out = model(**batch)
    assert calls == [1] and "ref_hidden" in out
    kwargs = {k: v for k, v in batch.items()}
    hf._Hooks.before(getattr(model, hf._STATE), model, (), {**kwargs, "fused_lm_head": True})
    assert getattr(model, hf._STATE).pending is None
