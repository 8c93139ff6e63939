"""One launch of tests/test_stacks.py's multi-process checks: ``torchrun --nproc_per_node=2 tests/stacks_worker.py
MODEL ROWS OUT SCENARIO...``. Each scenario wraps the same tiny PEFT Llama as a stack does, feeds rank r its half of
the global batch through ``safeshape.hf.token_loss`` (what the Trainer mixin calls) and, on rank 0, writes the
mean loss over ranks and the full LoRA (and trainable head) gradients to OUT/<scenario>.safetensors, or the
error to OUT/<scenario>.error. :func:`reference` is the same loss on one process and the whole batch."""
import json
import os
import sys
import tempfile
import time

import torch

GLOBAL_ROWS = 4


def lora_model(path, head_trainable=False, seed=0):
    """The tiny Llama at ``path`` with LoRA on q/v, lora_B moved off zero (test_hf's model too)."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(path),
                           LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], task_type="CAUSAL_LM"))
    with torch.no_grad():  # LoRA B starts at 0 (policy == reference); move it so the KL term is live
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    if head_trainable:
        model.get_base_model().lm_head.weight.requires_grad_(True)
    return model


def batch(path, rows, lo, hi):
    from transformers import AutoTokenizer

    from safeshape import hf

    return hf.DSSDataCollator(AutoTokenizer.from_pretrained(path))(rows[lo:hi])


def num_items(rows):
    return sum(sum(1 for y in r["labels"][1:] if y != -100) for r in rows[:GLOBAL_ROWS])


def clean(name: str) -> str:
    for wrapper in ("_fsdp_wrapped_module.", "_checkpoint_wrapped_module.", "module."):
        name = name.replace(wrapper, "")
    return name


def trainable_names(model):
    return [clean(n) for n, p in model.named_parameters() if p.requires_grad]


def reference(path, rows, head_trainable=False, loss="dss"):
    """(loss, {name: grad}) of one process on the global batch."""
    from safeshape import hf

    model = lora_model(path, head_trainable)
    value, _ = hf.token_loss(model, batch(path, rows, 0, GLOBAL_ROWS), loss=loss)
    value.backward()
    return float(value.detach()), {clean(n): p.grad for n, p in model.named_parameters() if p.requires_grad}


def _local_loss(model, path, rows, world, rank):
    from safeshape import hf

    per = GLOBAL_ROWS // world
    value, _ = hf.token_loss(model, batch(path, rows, rank * per, (rank + 1) * per),
                             num_items_in_batch=torch.tensor(num_items(rows)))
    return value * world  # as the mixin scales it: the wrappers average gradients over ranks


def _mean(value):
    import torch.distributed as dist

    v = value.detach().clone()
    dist.all_reduce(v)
    return float(v) / dist.get_world_size()


def run_fsdp1(path, rows, world, rank, head_trainable=False):
    """FSDP1 as accelerate wraps a PEFT model: PEFT's auto-wrap policy, use_orig_params=True. With the head
    trainable, its weight outside the forward is the rank's 1-D slice of the flat parameter: the loss must refuse
    it (the error file) and say how."""
    from peft.utils.other import fsdp_auto_wrap_policy
    from torch.distributed.fsdp import FullyShardedDataParallel as FSDP

    model = lora_model(path, head_trainable)
    wrapped = FSDP(model, auto_wrap_policy=fsdp_auto_wrap_policy(model), use_orig_params=True,
                   device_id=torch.device("cpu"))
    value = _local_loss(wrapped, path, rows, world, rank)
    value.backward()
    with FSDP.summon_full_params(wrapped, with_grads=True):
        grads = {clean(n): p.grad.clone() for n, p in wrapped.named_parameters() if p.requires_grad}
    return _mean(value), grads


def run_fsdp2(path, rows, world, rank, head_trainable=False):
    """FSDP2 torchtitan-style: each decoder layer a unit, the output head its own unit resharded after forward,
    and the root."""
    from torch.distributed.fsdp import fully_shard

    model = lora_model(path, head_trainable)
    inner = model.get_base_model()
    for layer in inner.model.layers:
        fully_shard(layer)
    fully_shard(inner.lm_head, reshard_after_forward=True)
    fully_shard(model)
    value = _local_loss(model, path, rows, world, rank)
    value.backward()
    grads = {clean(n): p.grad.full_tensor() for n, p in model.named_parameters() if p.requires_grad}
    return _mean(value), grads


def run_zero(path, rows, world, rank, stage, head_trainable=False):
    import deepspeed
    from deepspeed.utils import safe_get_full_grad

    # deepspeed's CPU shared-memory all-reduce is a C++ op compiled on first use (~35 s); gloo does the collectives
    # (the module by its sys.modules name: deepspeed.comm's `torch` attribute is torch itself)
    sys.modules["deepspeed.comm.torch"].build_shm_op = lambda: None

    model = lora_model(path, head_trainable)
    params = [p for p in model.parameters() if p.requires_grad]
    config = {"train_micro_batch_size_per_gpu": GLOBAL_ROWS // world, "gradient_accumulation_steps": 1,
              "zero_optimization": {"stage": stage}, "zero_allow_untested_optimizer": True,
              "steps_per_print": 10 ** 9}
    engine, *_ = deepspeed.initialize(model=model, optimizer=torch.optim.SGD(params, lr=0.0), config=config)
    if stage == 3:  # failure 4 of issue 21: the op on the weight as a plain attribute read finds it
        from safeshape import ops

        weight = model.get_base_model().lm_head.weight
        try:
            ops.fused_linear_token_loss_sum(torch.zeros(1, 32), weight, torch.tensor([0]), "sft")
        except RuntimeError as e:
            NOTES["before"] = f"{tuple(weight.shape)}: {e}"
    value = _local_loss(engine, path, rows, world, rank)
    engine.backward(value)
    grads = {clean(n): safe_get_full_grad(p).clone() for n, p in engine.module.named_parameters()
             if p.requires_grad}
    return _mean(value), grads


def run_trainer_ddp(path, rows, world, rank):
    """transformers.Trainer with the mixin under torchrun: DDP with Trainer's default for a PEFT model
    (ddp_find_unused_parameters=None, which becomes True); one step over the global batch."""
    from transformers import AutoTokenizer, Trainer, TrainerCallback, TrainingArguments

    from safeshape import hf

    class DSSTrainer(hf.TokenLossTrainerMixin, Trainer):
        pass

    class Spy(TrainerCallback):
        grads = None

        def on_pre_optimizer_step(self, args, state, control, model=None, **kw):
            Spy.grads = {clean(n): p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}

    model = lora_model(path)
    with tempfile.TemporaryDirectory() as out:
        args = TrainingArguments(output_dir=out, per_device_train_batch_size=GLOBAL_ROWS // world, max_steps=1,
                                 learning_rate=1e-3, max_grad_norm=0, remove_unused_columns=False, report_to=[],
                                 logging_steps=1, use_cpu=True, save_strategy="no", disable_tqdm=True,
                                 ddp_backend="gloo")
        trainer = DSSTrainer(model=model, args=args, train_dataset=rows[:GLOBAL_ROWS], loss="dss", kl_coef=0.5,
                             data_collator=hf.DSSDataCollator(AutoTokenizer.from_pretrained(path)), callbacks=[Spy()])
        trainer.train()
    assert type(trainer.model_wrapped).__name__ == "DistributedDataParallel", type(trainer.model_wrapped)
    assert trainer.model_wrapped.find_unused_parameters
    loss = next(h["loss"] for h in trainer.state.log_history if "loss" in h)
    return float(loss), Spy.grads


def run_trainer_ddp_compute_loss_func(path, rows, world, rank):
    """Failure 1 of issue 21: the deprecated recipe (prepare_model + compute_loss_func) under the same DDP; the
    error is kept for the test."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from safeshape import hf

    model = hf.prepare_model(lora_model(path))
    try:
        with tempfile.TemporaryDirectory() as out:
            args = TrainingArguments(output_dir=out, per_device_train_batch_size=GLOBAL_ROWS // world, max_steps=1,
                                     remove_unused_columns=False, report_to=[], use_cpu=True, save_strategy="no",
                                     disable_tqdm=True, ddp_backend="gloo")
            Trainer(model=model, args=args, train_dataset=rows[:GLOBAL_ROWS], compute_loss_func=hf.compute_loss,
                    data_collator=hf.DSSDataCollator(AutoTokenizer.from_pretrained(path))).train()
    except TypeError as e:
        NOTES["before"] = str(e)
    else:
        NOTES["before"] = "no error"
    return 0.0, {}


def run_tp_vocab(path, rows, world, rank, head_trainable=False, call="token_loss"):
    """Tensor parallelism: lm_head sharded over the vocabulary (ColwiseParallel(output_layouts=Shard(-1)), as
    Megatron and torchtitan shard it) on a 1-D mesh of the ranks, the same global batch on every rank, the loss
    called as a user would: ``hf.token_loss`` on the model, or (``call="loss_module"``) DSSLoss with the model as
    the head and the reference log-probs from the same model with its adapter disabled. Every rank holds the loss
    and the whole gradients: NOTES["ranks"] is their largest difference from rank 0's, NOTES["vocab_parallel_calls"]
    the objectives that went through the vocabulary-parallel loss (the head never gathered)."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    from safeshape.parallel import vocab

    model = lora_model(path, head_trainable)
    parallelize_module(model.get_base_model().lm_head, init_device_mesh("cpu", (world,)),
                       ColwiseParallel(output_layouts=Shard(-1)))
    assert isinstance(model.get_base_model().lm_head.weight, DTensor)
    inputs = batch(path, rows, 0, GLOBAL_ROWS)
    real, calls = vocab.vocab_parallel_fused_linear_token_loss_sum, []  # which objectives took the path
    vocab.vocab_parallel_fused_linear_token_loss_sum = lambda *a, **kw: calls.append(a[3]) or real(*a, **kw)
    try:
        value = _tp_loss(model, inputs, call)
    finally:
        vocab.vocab_parallel_fused_linear_token_loss_sum = real
    NOTES["vocab_parallel_calls"] = ",".join(calls)
    value.backward()
    grads = {clean(n): p.grad.full_tensor() if isinstance(p.grad, DTensor) else p.grad
             for n, p in model.named_parameters() if p.requires_grad}
    diff = torch.zeros(())
    for t in [value.detach(), *grads.values()]:
        first = t.clone()
        dist.broadcast(first, src=0)
        diff = torch.maximum(diff, (t - first).abs().max())
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    NOTES["ranks"] = repr(float(diff))
    return float(value.detach()), grads


def _tp_loss(model, inputs, call):
    """The DSS loss (kl_coef 0.5, with the reference pass) of the batch, called as ``call`` says."""
    from safeshape import hf
    from safeshape.loss import DSSLoss
    from safeshape.parallel import head as head_mod

    if call == "token_loss":
        return hf.token_loss(model, inputs)[0]
    labels, weights = inputs.pop("labels")[:, 1:], inputs.pop("star_weights")[:, 1:]  # row t predicts token t + 1
    with torch.no_grad(), model.disable_adapter():
        ref_hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][:, :-1]
        ref = head_mod.fused_linear_token_loss_sum(ref_hidden.reshape(-1, ref_hidden.shape[-1]), model,
                                                   labels.reshape(-1), "logprob")[2]
    hidden = model(**inputs, output_hidden_states=True).hidden_states[-1][:, :-1]
    return DSSLoss(kl_coef=0.5, kl="k2")(hidden=hidden, lm_head_weight=model, labels=labels, weights=weights,
                                         ref_logprobs=ref.view_as(labels)).loss


NOTES = {}  # what a scenario saw of the code before issue 21 (metadata "before"), and other metadata it keeps

SCENARIOS = {
    "trainer_ddp_compute_loss_func": run_trainer_ddp_compute_loss_func,
    "trainer_ddp": run_trainer_ddp,
    "fsdp1": run_fsdp1,
    "fsdp2": run_fsdp2,
    "fsdp2_head_trainable": lambda *a: run_fsdp2(*a, head_trainable=True),
    "zero2": lambda *a: run_zero(*a, stage=2),
    "zero3": lambda *a: run_zero(*a, stage=3),
    "zero3_head_trainable": lambda *a: run_zero(*a, stage=3, head_trainable=True),
    "fsdp1_head_trainable": lambda *a: run_fsdp1(*a, head_trainable=True),
    "tp_vocab": run_tp_vocab,
    "tp_vocab_loss_module": lambda *a: run_tp_vocab(*a, call="loss_module"),
    "tp_vocab_head_trainable": lambda *a: run_tp_vocab(*a, head_trainable=True),
}


def main(path, rows_path, out, *names):
    import torch.distributed as dist
    from safetensors.torch import save_file

    from safeshape.errors import SafeshapeError

    torch.set_num_threads(1)
    dist.init_process_group("gloo")
    world, rank = dist.get_world_size(), dist.get_rank()
    with open(rows_path) as f:
        rows = json.load(f)
    for name in names:
        start = time.perf_counter()
        try:
            loss, grads = SCENARIOS[name](path, rows, world, rank)
        except SafeshapeError as e:
            NOTES.clear()
            if rank == 0:
                with open(os.path.join(out, f"{name}.error"), "w") as f:
                    f.write(str(e))
            continue
        if rank == 0:
            save_file({k: v.contiguous() for k, v in grads.items()}, os.path.join(out, f"{name}.safetensors"),
                      metadata={"loss": repr(loss), "before": NOTES.pop("before", ""), **NOTES})
            print(f"stacks_worker: {name} {time.perf_counter() - start:.1f} s", file=sys.stderr)
        NOTES.clear()
    dist.destroy_process_group()


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main(*sys.argv[1:])
