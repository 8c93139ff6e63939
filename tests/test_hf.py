"""safeshape.hf.compute_loss as transformers.Trainer's compute_loss_func on a tiny Llama: the loss and the gradient
of an accumulated step equal docs/math.md#dss-normalisation (DSS) and docs/math.md#deep-token over the whole batch."""
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

from safeshape import hf, testing
from safeshape.data import IGNORE_INDEX
from safeshape.errors import SafeshapeError
from tests.stacks_worker import lora_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    path = testing.save_tiny_model(root / "model", hidden_size=32, vocab_size=320)
    return root, path, AutoTokenizer.from_pretrained(path)


def _peft_model(path, seed=0):
    return lora_model(path, seed=seed)


def _spec_loss(model, rows, collator, loss, kl_coef=0.5, betas=(0.5, 2.0, 2.0, 2.0, 2.0, 0.1)):
    batch = collator(rows)
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    with torch.no_grad(), model.disable_adapter():
        ref = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits.float()
    labels, w = batch["labels"][:, 1:], batch["star_weights"][:, 1:]
    mask = labels != IGNORE_INDEX
    idx = labels.clamp(min=0).unsqueeze(-1)
    lp = torch.log_softmax(logits[:, :-1], -1).gather(-1, idx).squeeze(-1)
    lref = torch.log_softmax(ref[:, :-1], -1).gather(-1, idx).squeeze(-1)
    if loss == "dss":
        per = w * (-lp) + kl_coef * (1 - w) * 0.5 * (lp - lref) ** 2
    else:  # deep-token: position t counts the response tokens of the row from 1; beta_t = betas[min(t, k) - 1]
        t = mask.long().cumsum(-1).clamp(1, len(betas))
        beta = torch.tensor(betas)[t - 1]
        per = (2 / beta) * -torch.nn.functional.logsigmoid(beta * (lp - lref))
    return per[mask].sum() / mask.sum()


class _Grads(TrainerCallback):
    def __init__(self, model):
        self.model, self.grads, self.losses = model, None, []

    def on_pre_optimizer_step(self, args, state, control, **kw):
        if self.grads is None:
            self.grads = {n: p.grad.detach().clone() for n, p in self.model.named_parameters() if p.requires_grad}

    def on_log(self, args, state, control, logs=None, **kw):
        if logs and "loss" in logs:
            self.losses.append(float(logs["loss"]))


@pytest.mark.parametrize("loss", ["dss", "deep-token"])
def test_trainer_step_equals_spec_loss_and_gradient(tiny, loss):
    root, path, tok = tiny
    data = testing.write_tiny_dataset(root / "rows.jsonl", 8, "dss", seed=11)
    rows = hf.encode_rows(data, tok, loss=loss, max_len=128)
    collator = hf.DSSDataCollator(tok)

    expected_model = _peft_model(path)
    expected = _spec_loss(expected_model, rows, collator, loss)
    expected.backward()
    expected_grads = {n: p.grad for n, p in expected_model.named_parameters() if p.requires_grad}

    model = hf.prepare_model(_peft_model(path), kl_coef=0.5, loss=loss)
    spy = _Grads(model)
    args = TrainingArguments(output_dir=str(root / f"trainer-{loss}"), per_device_train_batch_size=3,
                             gradient_accumulation_steps=3, max_steps=1, learning_rate=1e-3, max_grad_norm=0,
                             remove_unused_columns=False, report_to=[], logging_steps=1, use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    # 8 rows in micro-batches of 3, 3, 2: per-micro-batch means would weight the last one differently
    trainer = Trainer(model=model, args=args, train_dataset=rows, data_collator=collator,
                      compute_loss_func=hf.compute_loss, callbacks=[spy])
    trainer.train()
    assert spy.losses[0] == pytest.approx(float(expected), rel=1e-4)
    assert spy.grads.keys() == expected_grads.keys()
    for name, grad in expected_grads.items():
        torch.testing.assert_close(spy.grads[name], grad, rtol=1e-4, atol=1e-7)


def test_missing_weights_and_missing_hooks_are_clear(tiny):
    root, path, tok = tiny
    model = _peft_model(path)
    with pytest.raises(SafeshapeError, match="call safeshape.hf.prepare_model"):
        hf.compute_loss(model(input_ids=torch.tensor([[1, 5, 6]])), torch.tensor([[1, 5, 6]]))
    hf.prepare_model(model)
    with pytest.raises(SafeshapeError, match="no STAR weights.*remove_unused_columns=False"):
        hf.dss_compute_loss(model(input_ids=torch.tensor([[1, 5, 6]])), torch.tensor([[1, 5, 6]]))
    with pytest.raises(SafeshapeError, match="rows lack \\['weights'\\]"):
        hf.DSSDataCollator(tok)([{"input_ids": [1, 2], "labels": [1, 2]}])
    with pytest.raises(SafeshapeError, match="a PEFT model is needed"):
        hf.prepare_model(AutoModelForCausalLM.from_pretrained(path))
    with pytest.raises(SafeshapeError, match="loss must be one of"):
        hf.prepare_model(model, loss="dpo")


def test_encode_rows_rs_drops_rejected_rows(tiny):
    root, path, tok = tiny
    data = testing.write_tiny_dataset(root / "rs.jsonl", 12, "rs", seed=3)
    kept = hf.encode_rows(data, tok, loss="rs", max_len=128)
    every = hf.encode_rows(data, tok, loss="rs", max_len=128, rs_keep_rejected=True)
    rejected = [r for r in every if not any(w > 0 for w in r["weights"])]
    assert rejected and len(kept) == len(every) - len(rejected)
    assert all(any(w > 0 for w in r["weights"]) for r in kept)
