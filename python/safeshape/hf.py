"""The DSS (or Deep Token, SFT, RS) loss inside ``transformers.Trainer`` or TRL's ``SFTTrainer``.

The recipe: mix :class:`TokenLossTrainerMixin` into the trainer class; it overrides ``compute_loss``::

    from safeshape import hf
    class DSSTrainer(hf.TokenLossTrainerMixin, transformers.Trainer): ...   # or (..., trl.SFTTrainer)
    trainer = DSSTrainer(
        model=peft_model, loss="dss", kl_coef=0.5,
        train_dataset=hf.encode_rows("rows.jsonl", tokenizer, loss="dss"),
        data_collator=hf.DSSDataCollator(tokenizer),
        args=transformers.TrainingArguments(..., remove_unused_columns=False))  # keeps `weights`

(TRL: ``trl.SFTConfig(..., remove_unused_columns=False, dataset_kwargs={"skip_prepare_dataset": True})``.)
The per-token inputs (``star_weights`` from the collator; Deep Token's positions, from the labels) are taken out
of the batch before the model call and never ride on the model's output, so wrappers that rebuild the output (DDP
with ``find_unused_parameters=True``, FSDP1) leave them alone; the reference pass is the same (wrapped) model
called with its adapter disabled (no_grad); the head's weight is read however the stack holds it
(:mod:`safeshape.parallel.head`: DDP, FSDP1, FSDP2, DeepSpeed ZeRO-3, tensor parallel). The loss is divided by
``num_items_in_batch`` (the valid tokens of the whole accumulated batch over all processes, which Trainer counts)
as docs/math.md#dss-normalisation asks. docs/stacks.md lists the stacks and how each is tested.

Deprecated (TRL 2.0 removes ``compute_loss_func``, and it costs TRL an extra forward): ``prepare_model`` +
``compute_loss_func=hf.compute_loss``. ``prepare_model`` registers forward hooks on the PEFT model that attach
``star_weights``, the head weight and the reference hidden states to the outputs; it breaks under DDP with
``find_unused_parameters=True`` and FSDP1, which rebuild the output. ``unprepare_model`` removes the hooks.
"""
from __future__ import annotations

import functools
import math
import os
import warnings
from collections.abc import Mapping

import torch
from torch import Tensor, nn

from . import ops
from .data import IGNORE_INDEX, drop_rejected, load_examples, rows_loss
from .errors import SafeshapeError
from .loss import DEEP_TOKEN_BETAS, response_positions, uses_reference
from .models import body_and_head, check_fused_head, hf_model
from .parallel import head as _head

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
    def __init__(self, model: nn.Module, loss: str, kl_coef: float, betas: tuple[float, ...],
                 kl_clamp: float | None = None):
        self.model, self.loss, self.kl_coef, self.betas, self.pending = model, loss, kl_coef, betas, None
        self.kl_clamp = kl_clamp
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
        output[_STATE] = (self.loss, self.kl_coef, self.betas, self.kl_clamp)
        return output


def prepare_model(model: nn.Module, kl_coef: float = 0.5, *, loss: str = "dss",
                  deep_token_betas: tuple[float, ...] = DEEP_TOKEN_BETAS, kl_clamp: float | None = None) -> nn.Module:
    """Install the hooks :func:`compute_loss` relies on (on a PEFT model; returns it). ``loss``: dss, sft, rs
    (with rows from :func:`encode_rows` of the same loss) or deep-token. ``kl_coef`` is the DSS lambda; 0 skips
    the reference pass (as sft and rs do). ``kl_clamp``: the DSS k2 term's bound (docs/math.md#dss-kl-clamp)."""
    kl_coef = _check_loss("safeshape.hf.prepare_model", loss, kl_coef)
    kl_clamp = _check_clamp("safeshape.hf.prepare_model", loss, kl_clamp)
    warnings.warn("safeshape.hf.prepare_model + compute_loss_func=hf.compute_loss is deprecated (TRL 2.0 removes "
                  "compute_loss_func; DDP's find_unused_parameters and FSDP1 drop what the hooks attach): use "
                  "safeshape.hf.TokenLossTrainerMixin", FutureWarning, stacklevel=2)
    if not hasattr(model, "disable_adapter"):
        raise SafeshapeError("safeshape.hf.prepare_model: a PEFT model is needed (the reference is the same model "
                             "with its adapter disabled)")
    check_fused_head(hf_model(model), type(hf_model(model)).__name__)
    unprepare_model(model)  # preparing twice replaces the hooks
    setattr(model, _STATE, _Hooks(model, loss, float(kl_coef), tuple(float(b) for b in deep_token_betas), kl_clamp))
    return model


def unprepare_model(model: nn.Module) -> nn.Module:
    """Remove the hooks :func:`prepare_model` installed (no-op on a model without them); returns the model."""
    hooks = getattr(model, _STATE, None)
    if hooks is not None:
        for handle in hooks.handles:
            handle.remove()
        delattr(model, _STATE)
    return model


def _check_loss(where: str, loss: str, kl_coef: float) -> float:
    if loss not in LOSSES:
        raise SafeshapeError(f"{where}: loss must be one of {', '.join(LOSSES)}, not {loss!r}")
    if kl_coef < 0:
        raise SafeshapeError(f"{where}: kl_coef must be >= 0, not {kl_coef}")
    return 0.0 if loss in ("sft", "rs") else float(kl_coef)


def _check_clamp(where: str, loss: str, kl_clamp: float | None) -> float | None:
    if kl_clamp is None:
        return None
    if not (isinstance(kl_clamp, (int, float)) and math.isfinite(kl_clamp) and kl_clamp > 0):
        raise SafeshapeError(f"{where}: kl_clamp must be a finite number > 0 (or None), not {kl_clamp!r}")
    if loss != "dss":
        raise SafeshapeError(f"{where}: kl_clamp applies to loss dss (its k2 term), not {loss!r}")
    return float(kl_clamp)


def _token_loss(head, hidden: Tensor, ref_hidden: Tensor | None, labels: Tensor, star_weights: Tensor,
                spec: tuple[str, float, tuple[float, ...], float | None], num_items_in_batch,
                fused: bool = True) -> Tensor:
    """The loss of ``spec = (loss, kl_coef, betas, kl_clamp)`` from the final hidden states ``[B, T, H]`` (policy,
    and the reference's when the loss reads it), ``head`` = the head's weight or the (wrapped) model, divided by
    ``num_items_in_batch`` when given (else by the batch's valid tokens)."""
    loss, kl_coef, betas, kl_clamp = spec
    shifted = labels[:, 1:].to(hidden.device)  # row t predicts token t + 1
    flat_labels = shifted.reshape(-1)
    rows = (flat_labels != IGNORE_INDEX).nonzero().squeeze(1)
    if rows.numel() == 0:
        rows = rows.new_zeros(1)  # keeps the graph connected (zero gradient) and every rank in the collectives

    def pick(h: Tensor) -> Tensor:
        return h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, rows)

    flat_labels = flat_labels[rows]
    weights = star_weights[:, 1:].reshape(-1).to(hidden.device)[rows]
    loss_fn = _loss_module(loss, kl_coef, kl_clamp, betas, fused)
    if torch.is_tensor(num_items_in_batch):
        num_items_in_batch = num_items_in_batch.to(hidden.device)
    if loss == "deep-token":
        kw = dict(positions=response_positions(shifted, IGNORE_INDEX).reshape(-1)[rows])
    else:
        kw = dict(weights=weights)
    with _head.gathered(head, hidden.dtype) as head:  # a sharded head is gathered once for both calls
        ref = None
        if ref_hidden is not None:
            with torch.no_grad():
                ref = _head.fused_linear_token_loss_sum(pick(ref_hidden), head, flat_labels, "logprob")[2]
        if fused:
            out = loss_fn(hidden=pick(hidden), lm_head_weight=head, labels=flat_labels, ref_logprobs=ref,
                          num_items_in_batch=num_items_in_batch, **kw)
        else:
            out = loss_fn(logits=nn.functional.linear(pick(hidden), head), labels=flat_labels, ref_logprobs=ref,
                          num_items_in_batch=num_items_in_batch, **kw)
    return out.loss


def _peft_model(model: nn.Module) -> nn.Module:
    """The PEFT model inside DDP/FSDP1/DeepSpeed wrappers (an FSDP2 PEFT model is its own wrapper)."""
    inner = model
    while not hasattr(inner, "disable_adapter") and isinstance(getattr(inner, "module", None), nn.Module):
        inner = inner.module
    if not hasattr(inner, "disable_adapter"):
        raise SafeshapeError(f"safeshape.hf: {type(model).__name__} holds no PEFT model; the reference is the same "
                             "model with its adapter disabled, so a PEFT model is needed (loss sft or rs need none)")
    return inner


def _final_hidden(model: nn.Module, inputs: Mapping[str, Tensor]):
    """The model's outputs and its final (normed) hidden states; the logits of the last position only (the loss
    reads hidden states; full logits are never formed)."""
    outputs = model(**inputs, output_hidden_states=True, logits_to_keep=1, use_cache=False)
    return outputs, outputs.hidden_states[-1]


def token_loss(model: nn.Module, inputs: Mapping[str, Tensor], *, loss: str = "dss", kl_coef: float = 0.5,
               deep_token_betas: tuple[float, ...] = DEEP_TOKEN_BETAS, kl_clamp: float | None = None,
               num_items_in_batch: Tensor | int | None = None) -> tuple[Tensor, object]:
    """``(loss, model outputs)`` of a batch from :class:`DSSDataCollator` on a PEFT model however it is wrapped
    (DDP, FSDP1, FSDP2, a DeepSpeed engine): ``star_weights`` and ``labels`` are taken out of ``inputs`` before the
    model call; the reference hidden states come from the same model with the adapter disabled (no_grad). The
    loss is divided by ``num_items_in_batch`` when given (else by the batch's valid tokens). ``kl_clamp``: the DSS
    k2 term's bound as OpenRLHF clamps it (docs/math.md#dss-kl-clamp; None: unbounded). Every rank must call it
    (the head's gather is collective)."""
    kl_coef = _check_loss("safeshape.hf.token_loss", loss, kl_coef)
    kl_clamp = _check_clamp("safeshape.hf.token_loss", loss, kl_clamp)
    inputs = dict(inputs)
    star_weights, labels = inputs.pop("star_weights", None), inputs.pop("labels", None)
    if star_weights is None or labels is None:
        missing = [k for k, v in (("star_weights", star_weights), ("labels", labels)) if v is None]
        raise SafeshapeError(f"safeshape.hf: the batch lacks {missing}; feed batches from "
                             "safeshape.hf.DSSDataCollator with TrainingArguments(remove_unused_columns=False) so "
                             "Trainer keeps the rows' `weights`")
    ref_hidden = None
    if uses_reference(loss, kl_coef):
        with torch.no_grad(), _peft_model(model).disable_adapter():
            ref_hidden = _final_hidden(model, inputs)[1]
    outputs, hidden = _final_hidden(model, inputs)
    spec = (loss, kl_coef, tuple(float(b) for b in deep_token_betas), kl_clamp)
    return _token_loss(model, hidden, ref_hidden, labels, star_weights, spec, num_items_in_batch), outputs


class TokenLossTrainerMixin:
    """Mix into ``transformers.Trainer`` or ``trl.SFTTrainer`` (first in the bases): ``compute_loss`` is
    :func:`token_loss`. Keyword arguments ``loss`` (dss, sft, rs, deep-token), ``kl_coef`` (the DSS lambda),
    ``kl_clamp`` (the DSS k2 term's bound, docs/math.md#dss-kl-clamp) and ``deep_token_betas``; the rest goes to
    the trainer. Under several processes the loss is scaled as Trainer scales a loss normalised by
    ``num_items_in_batch`` (counted over all processes)."""

    def __init__(self, *args, loss: str = "dss", kl_coef: float = 0.5,
                 deep_token_betas: tuple[float, ...] = DEEP_TOKEN_BETAS, kl_clamp: float | None = None, **kwargs):
        self.safeshape_loss = dict(loss=loss, kl_coef=_check_loss(type(self).__name__, loss, kl_coef),
                                   deep_token_betas=tuple(float(b) for b in deep_token_betas),
                                   kl_clamp=_check_clamp(type(self).__name__, loss, kl_clamp))
        super().__init__(*args, **kwargs)
        check_fused_head(hf_model(self.model), type(hf_model(self.model)).__name__)
        # Trainer then counts num_items_in_batch (over labels[..., 1:], gathered over processes), passes it here,
        # and does not divide the loss by the accumulation steps again
        self.model_accepts_loss_kwargs = True

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        loss, outputs = token_loss(model, inputs, num_items_in_batch=num_items_in_batch, **self.safeshape_loss)
        if num_items_in_batch is not None and self.args.average_tokens_across_devices:
            # DDP/FSDP average the gradients over processes; num_items_in_batch counts all of theirs
            loss = loss * self.accelerator.num_processes
        return (loss, outputs) if return_outputs else loss


def compute_loss(outputs, labels: Tensor, num_items_in_batch: Tensor | int | None = None, *,
                 fused: bool = True) -> Tensor:
    """Deprecated (use :class:`TokenLossTrainerMixin`): ``compute_loss_func`` for ``transformers.Trainer``: the
    loss :func:`prepare_model` chose (docs/math.md#dss-loss, docs/math.md#deep-token) of a batch, divided by
    ``num_items_in_batch`` when given (else by the batch's valid tokens). Needs :func:`prepare_model`."""
    if _STATE not in outputs:
        raise SafeshapeError("safeshape.hf.compute_loss: the model outputs carry no STAR weights; call "
                             "safeshape.hf.prepare_model(model) before building the Trainer, and feed batches from "
                             "safeshape.hf.DSSDataCollator with TrainingArguments(remove_unused_columns=False) so "
                             "they keep `star_weights` (or, better, use safeshape.hf.TokenLossTrainerMixin: a "
                             "wrapper that rebuilds the model's output, DDP's find_unused_parameters or FSDP1, "
                             "drops what prepare_model attached)")
    return _token_loss(outputs["lm_head_weight"], outputs["hidden_states"][-1], outputs.get("ref_hidden"), labels,
                       outputs["star_weights"], outputs[_STATE], num_items_in_batch, fused)


dss_compute_loss = compute_loss  # the name of earlier releases


@functools.lru_cache(maxsize=8)
def _loss_module(loss: str, kl_coef: float, kl_clamp: float | None, betas: tuple[float, ...], fused: bool):
    from .loss import DeepTokenLoss, DSSLoss

    if loss == "deep-token":
        return DeepTokenLoss(betas=betas, fused=fused)
    return DSSLoss(kl_coef=kl_coef, kl="k2", fused=fused, kl_clamp=kl_clamp)
