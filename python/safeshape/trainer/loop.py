"""The training loop. One optimizer step:

1. take the step's rows from the epoch's seeded permutation (a pure function of the step, which makes --resume
   exact) and split them into ``grad_accum`` micro-batches per process;
2. count the valid (shifted) label tokens of the whole step over all micro-batches and processes: every
   micro-batch loss is divided by that count (docs/math.md#dss-normalisation), so k micro-batches give the update one batch of
   the same rows would;
3. per micro-batch: reference log-probs from the same model with the adapter disabled (DSS and Deep Token, no_grad,
   fused lm-head op), then the policy's final hidden states through DDP and the fused loss; backward;
4. clip, step, log a JSONL line, checkpoint every ``save_every`` steps and at the end.
"""
from __future__ import annotations

import json
import math
import os
import random
import shutil
import sys
import time
from contextlib import closing, nullcontext
from dataclasses import asdict, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from .. import ops
from ..data import IGNORE_INDEX, Example, collate, drop_rejected, load_examples, max_len_report, rows_loss
from ..datafiles import fingerprint
from ..distributed import Dist, setup
from ..errors import SafeshapeError
from ..hub import portable_name, resolve_folder
from ..io import (MANIFEST, atomic_write_text, check_replaceable, is_our_output, refuse_links_below, split_torn_tail,
                  write_json, write_manifest)
from ..loss import response_positions, uses_reference
from ..models import apply_lora, enable_checkpointing, load_model, load_tokenizer
from . import checkpoint as ckpt_io
from . import distributed
from .config import TrainConfig
from .model import PolicyHidden, head_weight
from .report import open_reporter

METRICS = "metrics.jsonl"
SUMMARY = "train_summary.json"


def check_out(config: TrainConfig) -> str:
    """Absolute ``out``; refuses to write over an input or an existing output that was not meant to be replaced."""
    from ..io import check_output_path

    # an existing `out` is judged below; --overwrite replaces only a run folder of ours (safeshape.io manifest)
    inputs = [("--model", config.model), ("--data", config.data)]
    if config.eval_data:
        inputs.append(("--eval-data", config.eval_data))
    out = str(check_output_path(config.out, config.overwrite, inputs, keep=not config.overwrite))
    if os.path.exists(out) and not os.path.isdir(out):
        raise SafeshapeError(f"--out {config.out}: exists and is not a folder")
    if os.path.isdir(out) and set(os.listdir(out)) - {MANIFEST} and not (config.resume or config.overwrite):
        raise SafeshapeError(f"--out {config.out}: exists and is not empty; pass --resume to continue that run or "
                             "--overwrite to replace it")
    return out


def lr_scheduler(config: TrainConfig, optimizer, total_steps: int):
    """transformers' schedules, as Trainer uses them: linear warmup from 0 over ``warmup_steps``, then linear decay
    to 0 at ``total_steps`` (``linear``) or a constant rate (``constant``)."""
    from transformers import get_scheduler

    name = {"linear": "linear", "constant": "constant_with_warmup"}[config.schedule]
    return get_scheduler(name, optimizer, num_warmup_steps=config.warmup_steps, num_training_steps=total_steps)


def seed_all(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


class Run:
    """Everything one training run holds; ``train_step(step)`` is one optimizer step."""

    def __init__(self, config: TrainConfig, dist: Dist):
        self.config, self.dist = config, dist
        progress = config.progress and dist.is_main
        seed_all(config.seed)  # identical LoRA initialisation on every process
        model_dir = resolve_folder(config.model, "--model")  # a folder, or a hub id through the HF cache
        self.tokenizer = load_tokenizer(model_dir)
        self.examples, self.dropped = load_examples(config.data, self.tokenizer, rows_loss(config.loss),
                                                    config.max_len, split=config.split, train_on=config.train_on,
                                                    progress=progress)
        self.truncated = sum(e.truncated for e in self.examples)
        note = max_len_report(self.examples, self.dropped, config.max_len)
        if note and dist.is_main:
            print(f"safeshape train: {note}", file=sys.stderr)
        self.rejected = 0
        if config.loss == "rs" and not config.rs_keep_rejected:
            kept = drop_rejected(self.examples)  # N counts the kept rows only
            self.rejected = len(self.examples) - len(kept)
            if not kept:
                raise SafeshapeError(f"{config.data}: --loss rs: every row has safe=false; nothing to train on")
            self.examples = kept
        self.eval_examples = []
        if config.eval_data:
            self.eval_examples, _ = load_examples(config.eval_data, self.tokenizer, rows_loss(config.loss),
                                                  config.max_len,
                                                  split=config.eval_split, train_on=config.train_on)
        pad = self.tokenizer.pad_token_id
        self.pad_id = pad if pad is not None else (self.tokenizer.eos_token_id or 0)
        model = load_model(model_dir, config.base_dtype, dist.device,
                           quantize=4 if config.load_in_4bit else 8 if config.load_in_8bit else None)
        if config.gradient_checkpointing:  # non-reentrant: LoRA inputs need no requires_grad, RNG is replayed
            enable_checkpointing(model)
        self.peft_model = apply_lora(model, config.lora_r, config.lora_alpha, config.lora_dropout,
                                     config.target_modules)
        # the saved adapter names its base so that it loads from any directory (AutoPeftModelForCausalLM)
        self.peft_model.peft_config["default"].base_model_name_or_path = portable_name(config.model)
        self.peft_model.train()
        seed_all(config.seed + dist.rank)  # distinct dropout streams per process
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=config.lr, weight_decay=config.weight_decay)
        self.global_batch = config.batch_size * config.grad_accum * dist.world_size
        self.steps_per_epoch = math.ceil(len(self.examples) / self.global_batch)
        self.total_steps = config.max_steps or config.epochs * self.steps_per_epoch
        self.scheduler = lr_scheduler(config, self.optimizer, self.total_steps)
        self.policy = PolicyHidden(self.peft_model)
        self.ddp = self.policy
        self.use_reference = uses_reference(config.loss, config.kl_coef)
        # bf16 autocast of the forward passes, independent of the dtype the weights were loaded in (--bf16)
        self.autocast_dtype = torch.bfloat16 if config.mixed_precision == "bf16" else None
        from ..loss import DeepTokenLoss, DSSLoss

        if config.loss == "deep-token":
            self.loss_module = DeepTokenLoss(betas=config.deep_token_betas, fused=config.fused)
        else:
            self.loss_module = DSSLoss(kl_coef=config.kl_coef if self.use_reference else 0.0, kl="k2",
                                       fused=config.fused, kl_clamp=config.dss_kl_clamp)
        # a rank with no rows in a micro-batch (last, partial step) still joins the collectives: one ignored token
        first = self.examples[0]
        self.empty_row = Example(first.input_ids[:2], [IGNORE_INDEX] * len(first.input_ids[:2]),
                                 [0.0] * len(first.input_ids[:2]), 0)

    @property
    def lm_head_weight(self) -> Tensor:
        """Read when used: under --fsdp it is a plain tensor only between the root's forward and backward."""
        return head_weight(self.peft_model)

    def wrap_ddp(self) -> None:
        """DDP over the processes, or FSDP2 under --fsdp; --compile compiles each decoder layer first."""
        launch = distributed.accelerate_fsdp()
        layers = (distributed.decoder_layers(self.peft_model, launch.layer_classes if launch else ())
                  if self.config.compile or self.config.fsdp else [])
        if self.config.compile:
            for layer in layers:
                layer.compile()
        if self.config.fsdp and self.dist.enabled:
            self.wrap_fsdp(layers)
        elif self.config.fsdp and self.dist.is_main:
            print("safeshape train: --fsdp with one process: nothing to shard over (launch several with torchrun)",
                  file=sys.stderr)
        elif self.dist.enabled:
            from torch.nn.parallel import DistributedDataParallel as DDP

            ids = [self.dist.device] if self.dist.device.type == "cuda" else None
            self.ddp = DDP(self.policy, device_ids=ids)

    def wrap_fsdp(self, layers: list) -> None:
        """Shard the policy (in place) and rebuild the optimizer and schedule over the sharded parameters, carrying
        over the state a --resume loaded (full tensors, sharded here)."""
        optimizer_state, scheduler_state = self.optimizer.state_dict(), self.scheduler.state_dict()
        distributed.shard_fsdp(self.policy, layers, self.dist.device)
        self.ddp = self.policy
        self.params = [p for p in self.peft_model.parameters() if p.requires_grad]
        self.optimizer = torch.optim.AdamW(self.params, lr=self.config.lr, weight_decay=self.config.weight_decay)
        self.scheduler = lr_scheduler(self.config, self.optimizer, self.total_steps)
        self.optimizer.load_state_dict(optimizer_state)
        distributed.shard_optimizer_state(self.optimizer)
        self.scheduler.load_state_dict(scheduler_state)

    def grad_sync(self, last: bool):
        """Gradient averaging over the processes at the step's last micro-batch only."""
        if last or not self.dist.enabled:
            return nullcontext()
        if self.config.fsdp:
            return distributed.fsdp_gradient_sync(self.policy, False)
        return self.ddp.no_sync()

    def clip_grads(self) -> Tensor:
        """The global gradient norm (of the whole, unsharded gradient under --fsdp); clips when --max-grad-norm."""
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.nn.utils.get_total_norm(grads)
        if distributed.is_dtensor(norm):
            norm = norm.full_tensor()
        if self.config.max_grad_norm > 0:
            torch.nn.utils.clip_grads_with_norm_(self.params, self.config.max_grad_norm, norm)
        return norm

    @property
    def sharding(self) -> str:
        return "fsdp" if self.config.fsdp and self.dist.enabled else "ddp" if self.dist.enabled else "none"

    def param_bytes(self) -> dict[str, int]:
        """Bytes of the parameters this process holds (its shards under --fsdp): frozen base and trainable."""
        out = {"base": 0, "trainable": 0}
        for p in self.peft_model.parameters():
            local = p.to_local() if distributed.is_dtensor(p) else p
            out["trainable" if p.requires_grad else "base"] += local.numel() * local.element_size()
        return out

    def full_adapter_state(self) -> dict[str, Tensor] | None:
        """Under --fsdp, the LoRA weights gathered from the shards (every process joins); else None (PEFT reads
        the model's own)."""
        if self.sharding != "fsdp":
            return None
        return distributed.full_state_dict({n: p for n, p in self.peft_model.named_parameters() if p.requires_grad})

    def full_optimizer_state(self) -> dict | None:
        """Under --fsdp, the optimizer state with its moments gathered (every process joins); else None."""
        if self.sharding != "fsdp":
            return None
        return distributed.full_optimizer_state(self.optimizer)

    def step_rows(self, step: int) -> list[int]:
        epoch, k = divmod(step, self.steps_per_epoch)
        g = torch.Generator().manual_seed(self.config.seed * 1_000_003 + epoch)
        perm = torch.randperm(len(self.examples), generator=g)
        return perm[k * self.global_batch:(k + 1) * self.global_batch].tolist()

    def micro_batches(self, step: int) -> list[dict[str, Tensor]]:
        rows, b, w, r = self.step_rows(step), self.config.batch_size, self.dist.world_size, self.dist.rank
        batches = []
        for j in range(self.config.grad_accum):
            mine = rows[(j * w + r) * b:(j * w + r + 1) * b]
            examples = [self.examples[i] for i in mine] or [self.empty_row]
            batches.append({k: v.to(self.dist.device) for k, v in collate(examples, self.pad_id).items()})
        return batches

    def micro_loss(self, batch: dict[str, Tensor], num_items: int, policy: torch.nn.Module | None = None):
        """Loss of one micro-batch, normalised by the step's valid-token count ``num_items``; ``policy`` (default:
        the DDP-wrapped model) computes the final hidden states."""
        ids, mask = batch["input_ids"], batch["attention_mask"]
        labels = batch["labels"][:, 1:]  # row t predicts token t + 1
        positions = response_positions(labels, IGNORE_INDEX).reshape(-1)
        labels, weights = labels.reshape(-1), batch["weights"][:, 1:].reshape(-1)
        rows = (labels != IGNORE_INDEX).nonzero().squeeze(1)
        if rows.numel() == 0:
            rows = rows.new_zeros(1)  # keeps the graph connected (zero gradient) for DDP
        labels, weights, positions = labels[rows], weights[rows], positions[rows]

        def pick(h: Tensor) -> Tensor:
            return h[:, :-1].reshape(-1, h.shape[-1]).index_select(0, rows)

        ref = None
        if self.use_reference:
            with torch.no_grad(), self.autocast():
                ref = self.reference_logprobs(pick(self.policy(ids, mask, reference=True)), labels)
        with self.autocast():
            hidden = pick((policy or self.ddp)(ids, mask))
        w_head = self.lm_head_weight
        if hidden.dtype != w_head.dtype:  # autocast ran the body in bf16: the head matmul too, as autocast would
            w_head = w_head.to(hidden.dtype)
        kw = dict(positions=positions, weights=None) if self.config.loss == "deep-token" else dict(weights=weights)
        if self.config.fused:
            return self.loss_module(hidden=hidden, lm_head_weight=w_head, labels=labels, ref_logprobs=ref,
                                    num_items_in_batch=num_items, **kw)
        return self.loss_module(logits=F.linear(hidden, w_head), labels=labels, ref_logprobs=ref,
                                num_items_in_batch=num_items, **kw)

    def autocast(self):
        if self.autocast_dtype is None:
            return nullcontext()
        return torch.autocast(self.dist.device.type, dtype=self.autocast_dtype)

    def reference_logprobs(self, hidden: Tensor, labels: Tensor) -> Tensor:
        """log p_ref(y_t) from the adapter-disabled model's final hidden states ``[N, H]``."""
        w_head = self.lm_head_weight.to(hidden.dtype)
        if self.config.fused:
            return ops.fused_linear_token_logprobs(hidden, w_head, labels)
        return ops.token_logprobs(F.linear(hidden, w_head), labels)

    def train_step(self, step: int) -> dict:
        t0 = time.perf_counter()
        batches = self.micro_batches(step)
        local = sum(int((b["labels"][:, 1:] != IGNORE_INDEX).sum()) for b in batches)
        num_items = int(self.dist.sum([local]).item())
        # [loss, sft, kl, tokens, weight * tokens, input tokens]
        stats = torch.zeros(6, dtype=torch.float64)
        for j, batch in enumerate(batches):
            last = j == len(batches) - 1
            sync = self.grad_sync(last)
            with sync:
                out = self.micro_loss(batch, num_items)
                # DDP averages gradients over processes; the loss is already a share of the global sum
                (out.loss * self.dist.world_size).backward()
            n = float(out.num_tokens)
            stats += torch.tensor([float(out.loss.detach()), float(out.sft_loss.detach()),
                                   float(out.kl_loss.detach()), n, float(out.mean_weight) * n,
                                   float(batch["attention_mask"].sum())], dtype=torch.float64)
        if self.dist.enabled:
            stats = self.dist.sum(stats).cpu()
        grad_norm = self.clip_grads()
        self.check_finite(step, float(stats[0]), float(grad_norm))  # before the step: the weights stay good
        lr = self.scheduler.get_last_lr()[0]
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        seconds = time.perf_counter() - t0
        loss, sft, kl, tokens, wsum, seen = stats.tolist()
        return {"step": step + 1, "epoch": round((step + 1) / self.steps_per_epoch, 6), "loss": loss,
                "sft_loss": sft, "kl_loss": kl, "mean_weight": wsum / tokens if tokens else 0.0,
                "tokens": int(tokens), "grad_norm": float(grad_norm), "lr": lr,
                "tokens_per_s": seen / seconds if seconds > 0 else 0.0}

    def check_finite(self, step: int, loss: float, grad_norm: float) -> None:
        """Stop with the step and the first non-finite tensor named when the loss or the gradients are NaN/inf (the
        same on every process: both are reduced over processes). Checkpoints already written are kept; no final
        adapter is written."""
        if math.isfinite(loss) and math.isfinite(grad_norm):
            return
        def bad(t: Tensor) -> bool:  # this process's shard only under --fsdp: no collective in the search
            return not torch.isfinite(t.to_local() if distributed.is_dtensor(t) else t).all()

        names = {id(p): n for n, p in self.peft_model.named_parameters()}
        first = next((f"the gradient of {names.get(id(p), '?')}" for p in self.params
                      if p.grad is not None and bad(p.grad)), None)
        first = next((f"the weight {n}" for n, p in self.peft_model.named_parameters()
                      if bad(p.detach())), first)  # a bad weight is the cause of bad gradients
        raise SafeshapeError(f"step {step + 1}: the loss is {loss} and the gradient norm {grad_norm} (not finite); "
                             f"training stopped before this step's update (first non-finite tensor: "
                             f"{first or 'none found, the loss itself'}). Checkpoints written before it are kept, "
                             "no final adapter is written: check the model and data, lower --lr, or resume from the "
                             "last checkpoint (--resume)")

    def evaluate(self) -> dict:
        """The training objective over the eval rows, no dropout, no grad, divided by all their valid tokens.

        Each process takes every world_size-th row; the unwrapped model is used, so processes may run different
        numbers of batches (DDP's forward would need them in step)."""
        mine = self.eval_examples[self.dist.rank::self.dist.world_size]
        local = sum(sum(1 for label in e.labels[1:] if label != IGNORE_INDEX) for e in mine)
        if self.config.fsdp and self.dist.enabled:  # sharded forwards are collectives: same batch count everywhere
            mine = mine + [self.empty_row] * (max(self.dist.gather_objects(len(mine))) - len(mine))
        total = int(self.dist.sum([local]).item())
        loss_sum, bs = 0.0, self.config.batch_size
        self.peft_model.eval()
        try:
            with torch.no_grad():
                for i in range(0, len(mine), bs):
                    batch = {k: v.to(self.dist.device) for k, v in collate(mine[i:i + bs], self.pad_id).items()}
                    loss_sum += float(self.micro_loss(batch, total, policy=self.policy).loss)
        finally:
            self.peft_model.train()
            if self.sharding == "fsdp":
                self.policy.reshard()  # a forward without backward leaves the root unit gathered
        return {"eval_loss": float(self.dist.sum([loss_sum])[0]), "eval_tokens": total}

    def rng_states(self) -> list[dict]:
        return self.dist.gather_objects(ckpt_io.rng_state())


def _prepare_out(out: str, config: TrainConfig, dist: Dist) -> str | None:
    """Rank 0 creates/cleans ``out``; returns the checkpoint to resume from, if any."""
    if dist.is_main:
        if config.overwrite and os.path.isdir(out):
            check_replaceable(out)  # (checked by check_out too) never delete a folder we did not write
            shutil.rmtree(out)
        os.makedirs(out, exist_ok=True)
        ckpt_io.remove_stale_temporaries(out)  # puts back a checkpoint a killed run had moved aside
        if not is_our_output(out) and (not os.listdir(out) or ckpt_io.latest_checkpoint(out)):
            write_manifest(out, "train")  # a new run folder (or an older version's run): --overwrite may replace it
        # appended to / written in place (the reporters' log folders too): never through a link
        refuse_links_below(out, [METRICS, SUMMARY, "runs", "wandb"])
    dist.barrier()
    return ckpt_io.latest_checkpoint(out) if config.resume else None


def _truncate_metrics(path: str, last_step: int) -> None:
    """On resume, keep the metric lines up to the checkpoint so the file reads like one uninterrupted run (a crash's
    torn last line is dropped: :func:`safeshape.io.split_torn_tail`; a damaged line ends the kept part)."""
    kept = []
    if os.path.isfile(path):
        with open(path, "rb") as f:
            lines, _ = split_torn_tail(f.read())
        for raw in lines:
            line = raw.decode("utf-8", errors="replace")
            try:
                if json.loads(line)["step"] <= last_step:
                    kept.append(line + "\n")
            except (json.JSONDecodeError, KeyError, TypeError):
                break
    atomic_write_text(path, "".join(kept), overwrite=True, what="metrics")


def train(config: TrainConfig) -> dict:
    """Run LoRA fine-tuning as ``config`` says; returns a summary (``steps``, ``final_loss``, ``out``, ...).

    Under ``torchrun --nproc_per_node=N`` every process calls this; rank 0 writes the outputs.
    """
    if (launch := distributed.accelerate_fsdp()) is not None:  # `accelerate launch` with an FSDP config
        config = replace(config, fsdp=True,
                         gradient_checkpointing=config.gradient_checkpointing or launch.activation_checkpointing)
    dist = setup(config.device)
    try:
        return _train(config, dist)
    finally:
        dist.close()


def _train(config: TrainConfig, dist: Dist) -> dict:
    from tqdm.auto import tqdm

    out = check_out(config)
    data_sha = fingerprint(config.data)
    run = Run(config, dist)
    ckpt = _prepare_out(out, config, dist)
    start = 0
    if ckpt is not None:
        ckpt_io.check_resumable(ckpt, config, data_sha, dist.world_size)
        start = ckpt_io.load_checkpoint(ckpt, run.peft_model, run.optimizer, run.scheduler, dist.rank)
        if start > run.total_steps:
            raise SafeshapeError(f"--resume from {ckpt}: it is at step {start}, past this run's {run.total_steps} "
                                 "steps; --max-steps/--epochs may extend a run, not shorten it")
    run.wrap_ddp()
    metrics_path = os.path.join(out, METRICS)
    if dist.is_main:
        _truncate_metrics(metrics_path, start)
    is_main = dist.is_main

    def save(step: int) -> None:
        states = run.rng_states()  # a collective: every rank joins
        adapter, optimizer = run.full_adapter_state(), run.full_optimizer_state()  # collectives under --fsdp
        if is_main:
            ckpt_io.save_checkpoint(out, step, run.peft_model, run.optimizer, run.scheduler, states, config,
                                    data_sha, step / run.steps_per_epoch, adapter_state=adapter,
                                    optimizer_state=optimizer)
        dist.barrier()

    reporter = open_reporter(config.report_to if is_main else "none", out, config)
    last = None
    bar = tqdm(total=run.total_steps, initial=start, desc="train", unit="step",
               disable=not (config.progress and is_main))
    with bar, closing(reporter):
        for step in range(start, run.total_steps):
            last = run.train_step(step)
            if run.eval_examples and ((config.eval_every and (step + 1) % config.eval_every == 0)
                                      or step + 1 == run.total_steps):
                last.update(run.evaluate())
            if is_main:
                with open(metrics_path, "a", encoding="utf-8") as f:
                    f.write(json.dumps(last) + "\n")
                reporter.log(last, last["step"])
                bar.set_postfix(loss=f"{last['loss']:.4f}", tok_s=f"{last['tokens_per_s']:.0f}")
            bar.update(1)
            done = step + 1
            if config.save_every and done % config.save_every == 0 and done != run.total_steps:
                save(done)
    save(run.total_steps)
    adapter = run.full_adapter_state()
    if is_main:
        ckpt_io.save_final_adapter(out, run.peft_model, adapter)
    if last is None and dist.is_main and os.path.getsize(metrics_path):  # resumed a finished run
        with open(metrics_path, encoding="utf-8") as f:
            last = json.loads(f.readlines()[-1])
    summary = {"steps": run.total_steps, "resumed_from": start if ckpt else None,
               "final_loss": last["loss"] if last else None, "out": out, "metrics": metrics_path,
               "eval_loss": last.get("eval_loss") if last else None,
               "examples": len(run.examples), "truncated_rows": run.truncated,
               "dropped_rows": len(run.dropped), "dropped_lines": run.dropped, "rejected_rows": run.rejected,
               "world_size": dist.world_size, "rank": dist.rank, "global_batch": run.global_batch,
               "param_bytes": run.param_bytes(), "sharding": run.sharding,
               "config": asdict(config)}
    if is_main:
        write_json(os.path.join(out, SUMMARY), summary, overwrite=True)
    dist.barrier()
    return summary
