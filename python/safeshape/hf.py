"""The DSS (or Deep Token, SFT, RS) loss inside ``transformers.Trainer`` (or TRL's ``SFTTrainer``) through
``compute_loss_func``.

``compute_loss_func`` only sees the model outputs, the labels and ``num_items_in_batch``; the STAR weights and the
reference pass need two more pieces, so the recipe is::

    from safeshape import hf
    model = hf.prepare_model(peft_model, kl_coef=0.5)  # hooks: STAR weights + reference hidden states
    trainer = transformers.Trainer(
        model=model, train_dataset=hf.encode_rows("rows.jsonl", tokenizer, loss="dss"),
        data_collator=hf.DSSDataCollator(tokenizer),
        args=transformers.TrainingArguments(..., remove_unused_columns=False),  # keeps `weights`
        compute_loss_func=hf.compute_loss)

For Deep Token: ``hf.prepare_model(peft_model, loss="deep-token")`` (betas as ``safeshape train``'s) and rows from
``hf.encode_rows(..., loss="deep-token")``; positions count from the first response token of each row.

``prepare_model`` registers forward hooks on the PEFT model: before forward they take ``star_weights`` out of the
inputs, ask for hidden states and for the logits of the last position only (full logits are never formed); after
forward they attach ``star_weights``, the ``lm_head`` weight and (DSS with ``kl_coef > 0``, Deep Token) the final
hidden states of the same model with the adapter disabled (no_grad) to the outputs. A forward without
``star_weights`` (generation, a plain evaluation) is left alone, and so is TRL's metrics forward
(``fused_lm_head=True``: TRL computes entropy and token accuracy with its own fused head). ``unprepare_model``
removes the hooks. ``compute_loss`` then runs the same fused ops as ``safeshape train`` and divides by
``num_items_in_batch`` (the valid tokens of the whole accumulated batch, which Trainer counts) as
docs/math.md#dss-normalisation asks.

TRL (``trl >= 1``): the same pieces go into ``trl.SFTTrainer``: pass ``compute_loss_func=hf.compute_loss``,
``data_collator=hf.DSSDataCollator(tokenizer)``, a dataset of :func:`encode_rows` rows and
``SFTConfig(remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})``.
"""
from __future__ import annotations

import functools
import os

import torch
from torch import Tensor, nn

from . import ops
from .data import IGNORE_INDEX, drop_rejected, load_examples, rows_loss
from .errors import SafeshapeError
from .loss import DEEP_TOKEN_BETAS, response_positions, uses_reference
from .trainer.model import body_and_head, check_fused_head, hf_model

_STATE = "_safeshape_dss"


LOSSES = ("dss", "sft", "rs", "deep-token")


def encode_rows(path: str | os.PathLike, tokenizer, loss: str = "dss", max_len: int = 512,
                rs_keep_rejected: bool = False) -> list[dict]:
    """Tokenised rows (``input_ids``, ``labels``, ``weights``) with the same rules as ``safeshape train`` (``rs``
    drops the rows with ``safe: false`` unless ``rs_keep_rejected``)."""
    if loss not in LOSSES:
        raise SafeshapeError(f"safeshape.hf.encode_rows: loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    examples, _ = load_examples(path, tokenizer, rows_loss(loss), max_len)
    if loss == "rs" and not rs_keep_rejected:
        examples = drop_rejected(examples)
    return [{"input_ids": e.input_ids, "labels": e.labels, "weights": e.weights} for e in examples]


class DSSDataCollator:
    """Right-pads rows from :func:`encode_rows` into ``input_ids``, ``attention_mask``, ``labels``,
    ``star_weights``."""

    def __init__(self, tokenizer, pad_to_multiple_of: int | None = None):
        pad = tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else tokenizer.eos_token_id
        self.multiple = pad_to_multiple_of

    def __call__(self, features: list[dict]) -> dict[str, Tensor]:
        missing = [k for k in ("input_ids", "labels", "weights") if k not in features[0]]
        if missing:
            raise SafeshapeError(f"DSSDataCollator: rows lack {missing}; build them with safeshape.hf.encode_rows "
                                 "and pass TrainingArguments(remove_unused_columns=False) so Trainer keeps "
                                 "`weights`")
        width = max(len(f["input_ids"]) for f in features)
        if self.multiple:
            width = -(-width // self.multiple) * self.multiple
        n = len(features)
        batch = {"input_ids": torch.full((n, width), self.pad_id, dtype=torch.long),
                 "attention_mask": torch.zeros((n, width), dtype=torch.long),
                 "labels": torch.full((n, width), IGNORE_INDEX, dtype=torch.long),
                 "star_weights": torch.zeros((n, width), dtype=torch.float32)}
        for i, f in enumerate(features):
            k = len(f["input_ids"])
            batch["input_ids"][i, :k] = torch.as_tensor(f["input_ids"])
            batch["attention_mask"][i, :k] = 1
            batch["labels"][i, :k] = torch.as_tensor(f["labels"])
            batch["star_weights"][i, :k] = torch.as_tensor(f["weights"], dtype=torch.float32)
        return batch


class _Hooks:
    def __init__(self, model: nn.Module, loss: str, kl_coef: float, betas: tuple[float, ...]):
        self.model, self.loss, self.kl_coef, self.betas, self.pending = model, loss, kl_coef, betas, None
        self.reference = uses_reference(loss, kl_coef)
        self.handles = [model.register_forward_pre_hook(self.before, with_kwargs=True),
                        model.register_forward_hook(self.after, with_kwargs=True)]

    def before(self, module, args, kwargs):
        weights = kwargs.pop("star_weights", None)
        if weights is None or kwargs.get("fused_lm_head"):  # a plain forward, or TRL's metrics forward
            self.pending = None
            return args, kwargs
        input_ids = kwargs.get("input_ids", args[0] if args else None)
        self.pending = (weights, input_ids, kwargs.get("attention_mask"))
        kwargs["output_hidden_states"] = True
        kwargs["logits_to_keep"] = 1  # the loss reads hidden states; logits of all positions are never formed
        return args, kwargs

    def after(self, module, args, kwargs, output):
        if self.pending is None:
            return output
        weights, input_ids, attention_mask = self.pending
        self.pending = None
        body, head_weight = body_and_head(self.model)
        output["star_weights"] = weights
        output["lm_head_weight"] = head_weight
        if self.reference:
            with torch.no_grad(), self.model.disable_adapter():
                ref = body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
            output["ref_hidden"] = ref
        output[_STATE] = (self.loss, self.kl_coef, self.betas)
        return output


def prepare_model(model: nn.Module, kl_coef: float = 0.5, *, loss: str = "dss",
                  deep_token_betas: tuple[float, ...] = DEEP_TOKEN_BETAS) -> nn.Module:
    """Install the hooks :func:`compute_loss` relies on (on a PEFT model; returns it). ``loss``: dss, sft, rs
    (with rows from :func:`encode_rows` of the same loss) or deep-token. ``kl_coef`` is the DSS lambda; 0 skips
    the reference pass (as sft and rs do)."""
    if loss not in LOSSES:
        raise SafeshapeError(f"safeshape.hf.prepare_model: loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if loss in ("sft", "rs"):
        kl_coef = 0.0
    if not hasattr(model, "disable_adapter"):
        raise SafeshapeError("safeshape.hf.prepare_model: a PEFT model is needed (the reference is the same model "
                             "with its adapter disabled)")
    if kl_coef < 0:
        raise SafeshapeError(f"safeshape.hf.prepare_model: kl_coef must be >= 0, not {kl_coef}")
    check_fused_head(hf_model(model), type(hf_model(model)).__name__)
    unprepare_model(model)  # preparing twice replaces the hooks
    setattr(model, _STATE, _Hooks(model, loss, float(kl_coef), tuple(float(b) for b in deep_token_betas)))
    return model


def unprepare_model(model: nn.Module) -> nn.Module:
    """Remove the hooks :func:`prepare_model` installed (no-op on a model without them); returns the model."""
    hooks = getattr(model, _STATE, None)
    if hooks is not None:
        for handle in hooks.handles:
            handle.remove()
        delattr(model, _STATE)
    return model


def compute_loss(outputs, labels: Tensor, num_items_in_batch: Tensor | int | None = None, *,
                 fused: bool = True) -> Tensor:
    """``compute_loss_func`` for ``transformers.Trainer``: the loss :func:`prepare_model` chose (docs/math.md#dss-loss,
    docs/math.md#deep-token) of a batch, divided by ``num_items_in_batch`` when given (else by the batch's valid
    tokens). Needs :func:`prepare_model`."""
    if _STATE not in outputs:
        raise SafeshapeError("safeshape.hf.compute_loss: the model outputs carry no STAR weights; call "
                             "safeshape.hf.prepare_model(model) before building the Trainer, and feed batches from "
                             "safeshape.hf.DSSDataCollator with TrainingArguments(remove_unused_columns=False) so "
                             "they keep `star_weights`")
    loss, kl_coef, betas = outputs[_STATE]
    hidden = outputs["hidden_states"][-1]
    weight = outputs["lm_head_weight"]
    shifted = labels[:, 1:].to(hidden.device)  # row t predicts token t + 1
    flat_labels = shifted.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    if rows.numel() == 0:
        rows = rows.new_zeros(1)  # keeps the graph connected (zero gradient)

    def pick(h: Tensor) -> Tensor:
        return h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, rows)

    flat_labels = flat_labels[rows]
    weights = outputs["star_weights"][:, 1:].reshape(-1).to(hidden.device)[rows]
    loss_fn = _loss_module(loss, kl_coef, betas, fused)
    ref = None
    if "ref_hidden" in outputs:
        with torch.no_grad():
            ref = ops.fused_linear_token_logprobs(pick(outputs["ref_hidden"]), weight, flat_labels)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    if loss == "deep-token":
        kw = dict(positions=response_positions(shifted, IGNORE_INDEX).reshape(-1)[rows])
    else:
        kw = dict(weights=weights)
    if fused:
        out = loss_fn(hidden=pick(hidden), lm_head_weight=weight, labels=flat_labels, ref_logprobs=ref,
                      num_items_in_batch=num_items_in_batch, **kw)
    else:
        out = loss_fn(logits=nn.functional.linear(pick(hidden), weight), labels=flat_labels, ref_logprobs=ref,
                      num_items_in_batch=num_items_in_batch, **kw)
    return out.loss


dss_compute_loss = compute_loss  # the name of earlier releases


@functools.lru_cache(maxsize=8)
def _loss_module(loss: str, kl_coef: float, betas: tuple[float, ...], fused: bool):
    from .loss import DeepTokenLoss, DSSLoss

    if loss == "deep-token":
        return DeepTokenLoss(betas=betas, fused=fused)
    return DSSLoss(kl_coef=kl_coef, kl="k2", fused=fused)
