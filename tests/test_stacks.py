"""The loss inside the training stacks of docs/stacks.md (issue 21): each stack on CPU with 2 gloo processes against
one process on the same global batch (loss and LoRA gradients to 1e-5), the Trainer/SFTTrainer mixin against the
spec loss, and the head-weight dispatch of safeshape.parallel.head with its refusals.

Fixed failures (each test fails on the code before the mixin and parallel/head.py): 1 HF Trainer DDP with the
find-unused default (test_two_processes_equal_one[trainer_ddp]; the deprecated recipe's crash is kept as
test_failure_1_...); 2 FSDP1 as accelerate wraps a PEFT model
([fsdp1]); 3 FSDP2 with the head its own unit, resharded after forward ([fsdp2], test_fsdp2_head_in_process);
4 DeepSpeed ZeRO-3 ([zero3], test_failure_4_... shows the op's message on the placeholder, and the trainable
head's refusal); 5 a head sharded over the vocabulary by tensor parallelism ([tp_vocab*]: hf.token_loss and the
loss modules with the model as the head, through parallel/vocab.py). FSDP1's trainable head shard is refused
(test_fsdp1_trainable_head_shard_is_refused_with_how)."""
import json
import os
import subprocess
import sys
import warnings

import pytest
import torch
from safetensors import safe_open

import safeshape
from safeshape import hf, testing
from safeshape.errors import SafeshapeError
from safeshape.parallel import head as head_mod

from tests import stacks_worker
from tests.torchrun_common import free_port

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
try:
    import deepspeed  # noqa: F401

    HAS_DEEPSPEED = True
except ImportError:  # DS_BUILD_OPS=0 pip install deepspeed (the Makefile's deps have it)
    HAS_DEEPSPEED = False

NEEDS_DS = pytest.mark.skipif(not HAS_DEEPSPEED, reason="needs deepspeed (DS_BUILD_OPS=0 pip install deepspeed)")
SCENARIOS = ["trainer_ddp", "fsdp1", "fsdp2", "fsdp2_head_trainable",
             pytest.param("zero2", marks=NEEDS_DS), pytest.param("zero3", marks=NEEDS_DS),
             "tp_vocab", "tp_vocab_loss_module", "tp_vocab_head_trainable"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("stacks")
    path = testing.save_tiny_model(root / "model", hidden_size=32, vocab_size=320)
    from transformers import AutoTokenizer

    rows = hf.encode_rows(testing.write_tiny_dataset(root / "rows.jsonl", stacks_worker.GLOBAL_ROWS, "dss", seed=3),
                          AutoTokenizer.from_pretrained(path), loss="dss", max_len=128)
    with open(root / "rows.json", "w") as f:
        json.dump(rows, f)
    return root, path, rows


@pytest.fixture(scope="module")
def two_processes(tiny):
    """One torchrun launch (fresh interpreters, one thread each) runs every scenario; OUT holds their results."""
    root, path, _ = tiny
    out = root / "out"
    out.mkdir()
    names = [n for n in stacks_worker.SCENARIOS if HAS_DEEPSPEED or not n.startswith("zero")]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
           f"--master_port={free_port()}", os.path.join(ROOT, "tests", "stacks_worker.py"), str(path),
           str(root / "rows.json"), str(out), *names]
    # the children import the safeshape this process imported (the installed one in CI, python/ in a dev build)
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(
        [os.path.dirname(os.path.dirname(safeshape.__file__)), ROOT, os.environ.get("PYTHONPATH", "")]))
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env)
    except subprocess.TimeoutExpired:
        pytest.fail("the 2-process stacks run did not finish in 600 s")
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-5000:]
    return out


@pytest.fixture(scope="module")
def references(tiny):
    _, path, rows = tiny
    return {trainable: stacks_worker.reference(path, rows, head_trainable=trainable) for trainable in (False, True)}


@pytest.mark.parametrize("scenario", SCENARIOS)
def test_two_processes_equal_one(two_processes, references, scenario):
    head_trainable = scenario.endswith("head_trainable")
    loss, grads = references[head_trainable]
    with safe_open(two_processes / f"{scenario}.safetensors", "pt") as f:
        got_loss = float(f.metadata()["loss"])
        got = {k: f.get_tensor(k) for k in f.keys()}
    assert got_loss == pytest.approx(loss, rel=1e-5)
    assert got.keys() == grads.keys()
    assert ("base_model.model.lm_head.weight" in got) == head_trainable
    for name, grad in grads.items():
        assert grad.abs().max() > 0, name
        torch.testing.assert_close(got[name], grad, rtol=1e-5, atol=1e-7, msg=name)


def _before(two_processes, scenario):
    with safe_open(two_processes / f"{scenario}.safetensors", "pt") as f:
        return f.metadata()["before"]


def test_failure_1_the_deprecated_recipe_breaks_under_ddp_find_unused(two_processes):
    """Why the mixin exists: what prepare_model attaches to the output kills DDP's output rebuild."""
    before = _before(two_processes, "trainer_ddp_compute_loss_func")
    assert "unexpected keyword argument 'star_weights'" in before, before


@NEEDS_DS
def test_failure_4_zero3_placeholder_reaches_the_op_as_the_issue_says(two_processes):
    before = _before(two_processes, "zero3")
    assert before.startswith("(0,):") and "2-D" in before, before


@NEEDS_DS
def test_zero3_trainable_head_is_refused_with_how(two_processes):
    message = (two_processes / "zero3_head_trainable.error").read_text()
    assert "ZeRO-3" in message and "Freeze the head" in message and "ZeRO-2 or FSDP2" in message


def test_fsdp1_trainable_head_shard_is_refused_with_how(two_processes):
    """FSDP1 as accelerate wraps a PEFT model whose head is trainable: outside the forward the head's weight is the
    rank's 1-D slice of the flat parameter, which cannot take a [V, H] gradient back; refused, saying how."""
    message = (two_processes / "fsdp1_head_trainable.error").read_text()
    assert "FSDP1 shard outside the forward (use_orig_params=True), and trainable" in message, message
    assert "Freeze the head" in message and "use_orig_params=False" in message and "FSDP2" in message, message


@pytest.mark.parametrize("scenario", ["tp_vocab", "tp_vocab_loss_module", "tp_vocab_head_trainable"])
def test_tensor_parallel_head_takes_the_vocabulary_parallel_loss(two_processes, scenario):
    """The vocabulary-sharded head (ColwiseParallel(output_layouts=Shard(-1))) is never gathered: the reference
    pass and the DSS loss both go through parallel/vocab.py, and every rank holds the same loss and gradients
    (test_two_processes_equal_one compares them with one process)."""
    with safe_open(two_processes / f"{scenario}.safetensors", "pt") as f:
        meta = f.metadata()
    assert meta["vocab_parallel_calls"] == "logprob,dss_k2", meta
    assert float(meta["ranks"]) == 0.0, meta


# ---- the Trainer / SFTTrainer mixin, one process ---------------------------------------------------------------

@pytest.mark.parametrize("loss", ["dss", "deep-token"])
def test_trainer_mixin_equals_spec_loss_and_gradient(tiny, loss):
    """Accumulated micro-batches of 3, 3, 2 rows: the loss and gradient of docs/math.md over the whole batch."""
    from transformers import AutoTokenizer, Trainer, TrainingArguments

    from tests.test_hf import _Grads, _peft_model, _spec_loss

    root, path, _ = tiny
    tok = AutoTokenizer.from_pretrained(path)
    rows = hf.encode_rows(testing.write_tiny_dataset(root / "rows8.jsonl", 8, "dss", seed=11), tok, loss=loss,
                          max_len=128)
    collator = hf.DSSDataCollator(tok)
    expected_model = _peft_model(path)
    expected = _spec_loss(expected_model, rows, collator, loss)
    expected.backward()

    class DSSTrainer(hf.TokenLossTrainerMixin, Trainer):
        pass

    model = _peft_model(path)
    spy = _Grads(model)
    args = TrainingArguments(output_dir=str(root / f"mixin-{loss}"), per_device_train_batch_size=3,
                             gradient_accumulation_steps=3, max_steps=1, learning_rate=1e-3, max_grad_norm=0,
                             remove_unused_columns=False, report_to=[], logging_steps=1, use_cpu=True,
                             save_strategy="no", disable_tqdm=True)
    trainer = DSSTrainer(model=model, args=args, train_dataset=rows, data_collator=collator, callbacks=[spy],
                         loss=loss, kl_coef=0.5)
    trainer.train()
    assert spy.losses[0] == pytest.approx(float(expected.detach()), rel=1e-4)
    for name, p in expected_model.named_parameters():
        if p.requires_grad:
            torch.testing.assert_close(spy.grads[name], p.grad, rtol=1e-4, atol=1e-7)


def test_sft_trainer_mixin_runs_dss(tiny):
    """trl.SFTTrainer with the mixin: the first logged loss is the spec DSS loss of the batch (no compute_loss_func,
    so no deprecation warning from TRL)."""
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from transformers import AutoTokenizer

    from tests.test_hf import _peft_model, _spec_loss

    root, path, rows = tiny
    tok = AutoTokenizer.from_pretrained(path)
    collator = hf.DSSDataCollator(tok)
    expected = float(_spec_loss(_peft_model(path), rows, collator, "dss"))

    class DSSSFTTrainer(hf.TokenLossTrainerMixin, trl.SFTTrainer):
        pass

    args = trl.SFTConfig(output_dir=str(root / "sft-mixin"), max_steps=1, per_device_train_batch_size=len(rows),
                         learning_rate=1e-3, logging_steps=1, report_to=[], remove_unused_columns=False,
                         dataset_kwargs={"skip_prepare_dataset": True}, use_cpu=True, save_strategy="no",
                         disable_tqdm=True)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer = DSSSFTTrainer(model=_peft_model(path), args=args, train_dataset=datasets.Dataset.from_list(rows),
                                data_collator=collator, processing_class=tok, loss="dss")
        trainer.train()
    assert not [w for w in caught if "compute_loss_func" in str(w.message)]
    logged = [h for h in trainer.state.log_history if "loss" in h]
    assert logged[0]["loss"] == pytest.approx(expected, rel=1e-4)


def test_mixin_and_token_loss_refuse_what_they_cannot_run(tiny):
    from transformers import Trainer

    from tests.test_hf import _peft_model

    _, path, rows = tiny
    model = _peft_model(path)

    class DSSTrainer(hf.TokenLossTrainerMixin, Trainer):
        pass

    with pytest.raises(SafeshapeError, match="loss must be one of"):
        DSSTrainer(model=model, loss="dpo")
    batch = {k: v for k, v in hf.DSSDataCollator(type("T", (), {"pad_token_id": 0})())(rows[:1]).items()
             if k != "star_weights"}
    with pytest.raises(SafeshapeError, match=r"lacks \['star_weights'\].*remove_unused_columns=False"):
        hf.token_loss(model, batch)
    with pytest.raises(SafeshapeError, match="holds no PEFT model"):
        hf.token_loss(model.get_base_model(), {**batch, "star_weights": torch.ones_like(batch["labels"])})


def test_prepare_model_is_deprecated(tiny):
    from tests.test_hf import _peft_model

    with pytest.warns(FutureWarning, match="TokenLossTrainerMixin"):
        hf.prepare_model(_peft_model(tiny[1]))


# ---- safeshape.parallel.head: the weight however it is held, in one process -----------------------------------

def _dss_sum(hidden, head, labels):
    return head_mod.fused_linear_token_loss_sum(hidden, head, labels, "dss_k2", [0.5],
                                                weights=torch.rand(labels.shape[0], generator=torch.Generator().manual_seed(1)),
                                                ref_logprobs=torch.full(labels.shape, -3.0))


def test_plain_weight_module_and_model_give_the_op(tiny):
    from safeshape import ops

    from tests.test_hf import _peft_model

    model = _peft_model(tiny[1])
    weight = model.get_base_model().lm_head.weight
    hidden = torch.randn(6, weight.shape[1], requires_grad=True)
    labels = torch.tensor([3, 7, -100, 11, 5, 2])
    kw = dict(weights=torch.rand(6, generator=torch.Generator().manual_seed(1)),
              ref_logprobs=torch.full((6,), -3.0))
    expected = ops.fused_linear_token_loss_sum(hidden, weight, labels, "dss_k2", [0.5], **kw)[0]
    for head in (weight, model.get_base_model().lm_head, model):
        assert head_mod.head_layout(head) == "plain"
        torch.testing.assert_close(_dss_sum(hidden, head, labels)[0], expected)


def test_a_flattened_weight_is_refused_by_name():
    with pytest.raises(SafeshapeError, match=r"a Parameter of shape \(640,\), not the \[vocab, hidden\] matrix"):
        _dss_sum(torch.randn(2, 32), torch.nn.Parameter(torch.randn(640)), torch.tensor([1, 2]))


@pytest.fixture
def one_rank_group():
    """A 1-process gloo group in this process (a DTensor needs one); destroyed afterwards."""
    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group already exists in this process")
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    yield
    dist.destroy_process_group()


def test_fsdp2_head_in_process(tiny, one_rank_group):
    """Failure 3 at one rank: the head its own FSDP2 unit, resharded after forward, so lm_head.weight is a DTensor.
    The op on it fails as the issue says; through the model (what the mixin passes) the loss is the plain one."""
    from torch.distributed.fsdp import fully_shard

    from safeshape import ops

    from tests.test_hf import _peft_model

    _, path, rows = tiny
    batch = stacks_worker.batch(path, rows, 0, 2)
    expected, _ = hf.token_loss(_peft_model(path), batch)
    model = _peft_model(path)
    fully_shard(model.get_base_model().lm_head, reshard_after_forward=True)
    fully_shard(model)
    value, _ = hf.token_loss(model, batch)
    torch.testing.assert_close(value, expected)
    weight = model.get_base_model().lm_head.weight
    assert head_mod.head_layout(model) == "fsdp2"
    hidden, labels = torch.randn(2, weight.shape[1]), torch.tensor([1, 2])
    with pytest.raises(Exception, match="mixed torch.Tensor and DTensor"):
        ops.fused_linear_token_loss_sum(hidden, weight, labels, "sft")
    # the bare weight cannot say whether FSDP or tensor parallelism sharded it
    with pytest.raises(SafeshapeError, match=r"DTensor with placements \(Shard\(dim=0\),\).*pass the head module"):
        _dss_sum(hidden, weight, labels)


def test_tensor_parallel_head_goes_to_the_vocabulary_parallel_loss(one_rank_group, monkeypatch):
    """The dispatch at one rank: a DTensor head not managed by FSDP goes to parallel/vocab.py (a stub here; the real
    one on 2 ranks is [tp_vocab*]); a layout it does not recognise is refused with its placements and mesh."""
    import types

    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor

    mesh = init_device_mesh("cpu", (1,))
    calls = []
    stub = types.ModuleType("safeshape.parallel.vocab")
    stub.tp_vocab_shard = lambda w: (w.to_local(), "group", 0) if w.placements == (Shard(0),) else None
    stub.vocab_parallel_fused_linear_token_loss_sum = lambda *a, **kw: calls.append((a, kw)) or "vp"
    monkeypatch.setitem(sys.modules, "safeshape.parallel.vocab", stub)
    import safeshape.parallel

    monkeypatch.setattr(safeshape.parallel, "vocab", stub, raising=False)
    linear = torch.nn.Linear(4, 8, bias=False)
    linear.weight = torch.nn.Parameter(distribute_tensor(linear.weight.detach(), mesh, [Shard(0)]))
    hidden, labels = torch.randn(3, 4), torch.tensor([1, 2, 3])
    assert head_mod.head_layout(linear) == "dtensor"
    assert head_mod.fused_linear_token_loss_sum(hidden, linear, labels, "sft") == "vp"
    (args, kw), = calls
    assert args[0] is hidden and args[1].shape == (8, 4) and args[3] == "sft"
    assert kw["group"] == "group" and kw["vocab_start"] == 0
    linear.weight = torch.nn.Parameter(distribute_tensor(linear.weight.full_tensor().detach(), mesh, [Replicate()]))
    with pytest.raises(SafeshapeError, match=r"placements \(Replicate\(\),\).*not managed by FSDP"):
        head_mod.fused_linear_token_loss_sum(hidden, linear, labels, "sft")
