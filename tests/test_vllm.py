"""`--engine vllm` against the hf engines on tiny random models, float32 (docs/engines.md): greedy token ids
identical (base model and a LoRA adapter as a LoRA request), STAR P(safe) per prefix and the judge's P(unsafe)
within 1e-5 for the exact and the authors' recipes, and `safeshape eval` / `safeshape star` end to end.

`--data-parallel-size 2` (two engines, one core each) against one engine: `safeshape eval` killed with SIGKILL and
resumed, `safeshape star`; the replicas' machinery (shards, order, a failing replica) on a stand-in engine.

Skipped without vLLM (but the stand-in engine's tests); `make test-vllm` builds an environment with vLLM's CPU build
and runs this module. Each engine start costs ~40 s of CPU here, so the engines are module fixtures (14 starts in
all, 8 of them the data-parallel runs')."""
from __future__ import annotations

import json
import os
import re

import pytest

import torch

from safeshape import testing as T
from safeshape.cli import main as cli_main
from safeshape.errors import SafeshapeError
from safeshape.star import StarScorer, tiny

HAS_VLLM = __import__("importlib").util.find_spec("vllm") is not None
needs_vllm = pytest.mark.skipif(not HAS_VLLM, reason="needs vLLM (make test-vllm)")
os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")  # GiB per engine: the tiny models need little

TOL = 1e-5
PRESET = "llama-guard-3"  # the tiny guard's template is Llama Guard 3's


# ---- a missing or mismatched install (no engine started) -----------------------------------------------------------
@pytest.mark.skipif(HAS_VLLM, reason="vLLM is installed: the missing-package message is not shown")
@pytest.mark.parametrize("command", ["eval", "star"])
def test_missing_vllm_is_a_clear_error(tmp_path, capsys, command):
    tiny.save_tiny_guard(tmp_path / "guard")
    (tmp_path / "d.jsonl").write_text('{"prompt": "a b", "response": "c d"}\n')
    args = (["eval", "--model", str(tmp_path / "guard"), "--harmful", str(tmp_path / "d.jsonl")] if command == "eval"
            else ["star", "--guard", str(tmp_path / "guard"), "--data", str(tmp_path / "d.jsonl")])
    assert cli_main(args + ["--out", str(tmp_path / "o"), "--engine", "vllm", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--engine vllm needs vLLM, which is not installed: pip install 'safeshape[vllm]'" in err
    assert not (tmp_path / "o").exists()


def test_torch_pin_mismatch_is_a_clear_error(monkeypatch):
    from safeshape import vllm_support

    monkeypatch.setattr(vllm_support, "distribution", lambda: ("vllm-cpu", "0.32.0"))
    monkeypatch.setattr(vllm_support, "torch_pin", lambda name: "1.0.0+cpu")
    monkeypatch.setattr(vllm_support.importlib.util, "find_spec", lambda name: object())
    with pytest.raises(SafeshapeError, match=r"--engine vllm: vllm-cpu 0.32.0 was built for torch 1.0.0\+cpu, but "
                                             rf"torch {re.escape(torch.__version__)} is imported"):
        vllm_support.check("--engine vllm")


def _policy(folder):
    """A tiny random policy with weights wide enough that greedy choices are not near-ties (head size 32: vLLM's
    CPU attention needs a multiple of 32), + a LoRA adapter with non-zero B."""
    from peft import LoraConfig, get_peft_model

    tok = T.build_tiny_tokenizer(vocab_size=320)
    model = tiny.build_model(len(tok), hidden=128, layers=2, seed=1)
    for cfg in (model.config, model.generation_config):
        cfg.bos_token_id, cfg.eos_token_id, cfg.pad_token_id = tok.bos_token_id, tok.eos_token_id, tok.pad_token_id
    model.save_pretrained(folder / "policy")
    tok.save_pretrained(folder / "policy")
    torch.manual_seed(2)
    peft = get_peft_model(model, LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj", "down_proj"],
                                            init_lora_weights=False))
    with torch.no_grad():
        for n, p in peft.named_parameters():
            if "lora_" in n:
                p.mul_(4.0)  # an adapter that changes the greedy path
    peft.save_pretrained(folder / "adapter")
    return folder / "policy", folder / "adapter"


def _guard(folder, rows):
    """A tiny random guard whose verdict tokens' logits are lifted to the top of the vocabulary and kept close to
    each other, so that the authors' top-k/top-p keeps both verdicts at some prefixes, one at others and neither
    at the rest (all three cases are compared)."""
    model, tok = tiny.build_tiny_guard(hidden=128)
    scorer = StarScorer(model, tok, preset=PRESET, engine="naive", recipe="authors")
    seqs = [gi.prefix_ids(k) for gi in (scorer.build(r["prompt"], r["response"]) for r in rows)
            for k in range(1, gi.num_prefixes + 1)]
    safe, unsafe = scorer.verdict_ids
    with torch.no_grad():
        out = [model(torch.tensor([s]), output_hidden_states=True) for s in seqs[::3]]
        u = torch.stack([o.hidden_states[-1][0, -1] for o in out]).mean(0)
        top = torch.stack([o.logits[0, -1].max() for o in out]).mean()
        w = model.lm_head.weight
        w[safe] += 2 * top * u / (u @ u)
        w[unsafe] = w[safe] + 0.05 * torch.randn(u.shape, generator=torch.Generator().manual_seed(0))
    model.save_pretrained(folder)
    tok.save_pretrained(folder)


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    root = tmp_path_factory.mktemp("vllm")
    policy, adapter = _policy(root)
    prompts = T.corpus(6, seed=7)
    prompts[1] = "Hi."
    rows = [{"prompt": p, "response": tiny.random_text(n, seed=i)} for i, (p, n) in
            enumerate(zip(prompts, (23, 7, 41, 12, 5, 30)))]
    _guard(root / "guard", rows)
    (root / "harmful.jsonl").write_text("".join(json.dumps({"prompt": p}) + "\n" for p in prompts))
    (root / "star.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return {"root": root, "policy": policy, "adapter": adapter, "guard": root / "guard", "prompts": prompts,
            "rows": rows}


def _hf(folder):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(folder)


# ---- generation --------------------------------------------------------------------------------------------------
@needs_vllm
def test_greedy_ids_equal_transformers_base_and_lora(world):
    from peft import PeftModel

    from safeshape.eval.generate import GenerationSettings, render_prompt, stop_ids
    from safeshape.eval.vllm_engine import VllmPolicy

    settings = GenerationSettings(max_new_tokens=16)
    model, tok = _hf(world["policy"])
    ids = [render_prompt(tok, p) for p in world["prompts"]]
    policy = VllmPolicy(str(world["policy"]), [str(world["adapter"])])
    try:
        theirs = {a: [list(o.outputs[0].token_ids) for o in policy.llm.generate(
            [{"prompt_token_ids": s} for s in ids],
            __import__("vllm").SamplingParams(max_tokens=16, temperature=0.0,
                                              stop_token_ids=stop_ids(model, tok), detokenize=False),
            use_tqdm=False, lora_request=policy.lora_request(a))] for a in (None, str(world["adapter"]))}
        gens = {a: policy.generate_ids(tok, ids, settings, [0] * len(ids), a) for a in (None, str(world["adapter"]))}
    finally:
        policy.close()
    lora = PeftModel.from_pretrained(_hf(world["policy"])[0], str(world["adapter"])).eval()
    eos = stop_ids(model, tok)
    for adapter, m in ((None, model), (str(world["adapter"]), lora)):
        for s, got, g in zip(ids, theirs[adapter], gens[adapter]):  # one prompt at a time: no padding
            out = m.generate(torch.tensor([s]), max_new_tokens=16, do_sample=False, eos_token_id=eos,
                             pad_token_id=tok.pad_token_id)[0, len(s):].tolist()
            stop = next((i for i, t in enumerate(out) if t in eos), None)
            want = out if stop is None else out[:stop + 1]
            assert got == want, (adapter, s)
            assert g.new_tokens == len(want) and g.finished == (stop is not None)
            assert g.response == tok.decode(want[:stop] if stop is not None else want, skip_special_tokens=True).strip()
    assert theirs[None] != theirs[str(world["adapter"])]  # the adapter was applied


# ---- STAR and the judge ------------------------------------------------------------------------------------------
def _hf_values(world, recipe):
    from safeshape.star import load_guard

    guard, tok = load_guard(str(world["guard"]))
    scorer = StarScorer(guard, tok, preset=PRESET, engine="naive", recipe=recipe)
    items = [(r["prompt"], r["response"]) for r in world["rows"]]
    return scorer.score(items), scorer.score_full(items), scorer


def _vllm_values(world, recipe):
    from safeshape.star.guard import load_guard_tokenizer
    from safeshape.star.vllm_engine import VllmGuard

    tok = load_guard_tokenizer(world["guard"])
    guard = VllmGuard(str(world["guard"]), recipe=recipe)
    try:
        scorer = StarScorer(guard, tok, preset=PRESET, engine="vllm", recipe=recipe)
        items = [(r["prompt"], r["response"]) for r in world["rows"]]
        return scorer.score(items), scorer.score_full(items), scorer
    finally:
        guard.close()


@needs_vllm
@pytest.mark.parametrize("recipe", ["exact", "authors"])
def test_star_values_match_the_hf_engines(world, recipe):
    prefixes, full, scorer = _vllm_values(world, recipe)
    want, want_full, hf = _hf_values(world, recipe)
    # the authors' temperature 0.2 multiplies the two engines' float32 logit differences (~1e-6) by five
    tol = TOL if recipe == "exact" else TOL / 0.2
    assert [len(v) for v in prefixes] == [len(v) for v in want] and sum(map(len, want)) > 20
    for got, exp in zip(prefixes, want):
        assert got == pytest.approx(exp, abs=tol)
    assert full == pytest.approx(want_full, abs=tol)
    assert scorer.stats["both_masked"] == hf.stats["both_masked"]
    flat = [v for r in want for v in r]
    if recipe == "authors":  # both verdicts kept, one kept (V is 0 or 1), neither kept (the fallback): all compared
        assert 0 < hf.stats["both_masked"] and sum(v in (0.0, 1.0) for v in flat) > 0
        assert hf.stats["both_masked"] + sum(v in (0.0, 1.0) for v in flat) < len(flat)
    assert len({round(v, 3) for v in flat}) > len(flat) // 2  # values that differ: the test can fail
    assert scorer.stats["guard_tokens"] > 0


@needs_vllm
def test_vllm_engine_needs_a_vllm_guard(world):
    from safeshape.star import load_guard

    guard, tok = load_guard(str(world["guard"]))
    with pytest.raises(SafeshapeError, match="engine 'vllm' needs a safeshape.star.vllm_engine.VllmGuard"):
        StarScorer(guard, tok, preset=PRESET, engine="vllm")


# ---- the commands end to end -------------------------------------------------------------------------------------
def _eval(world, out, engine):
    return ["eval", "--model", str(world["policy"]), "--adapter", f"lora={world['adapter']}",
            "--harmful", str(world["root"] / "harmful.jsonl"), "--guard", str(world["guard"]), "--preset", PRESET,
            "--max-new-tokens", "12", "--batch-size", "4", "--no-progress", "--out", str(out), "--engine", engine]


@pytest.fixture(scope="module")
def eval_one(world, tmp_path_factory):
    """`safeshape eval --engine vllm` with one engine (the reference of the data-parallel runs)."""
    out = tmp_path_factory.mktemp("eval-one") / "vllm"
    assert cli_main(_eval(world, out, "vllm")) == 0
    return out


@pytest.fixture(scope="module")
def star_one(world, tmp_path_factory):
    out = tmp_path_factory.mktemp("star-one") / "vllm.jsonl"
    assert cli_main(_star(world, out, "vllm")) == 0
    return out


def _star(world, out, engine):
    return ["star", "--guard", str(world["guard"]), "--data", str(world["root"] / "star.jsonl"), "--out", str(out),
            "--engine", engine, "--no-progress", "--preset", PRESET]


def _responses(folder):
    return sorted(({k: r[k] for k in ("model", "set", "index", "response", "new_tokens", "finished")}
                   for r in map(json.loads, (folder / "responses.jsonl").read_text().splitlines()[1:])), key=str)


def _same_report(a, b, exact=("harmful_rate", "refusal_rate")):
    for x, y in zip(a["models"], b["models"], strict=True):
        assert x["safety"]["mean_p_unsafe"] == pytest.approx(y["safety"]["mean_p_unsafe"], abs=TOL)
        for key in exact:
            assert x["safety"][key] == y["safety"][key]


@needs_vllm
def test_eval_end_to_end_equals_hf(world, eval_one, tmp_path, capsys):
    from safeshape.eval.report import table

    assert cli_main(_eval(world, tmp_path / "hf", "hf")) == 0
    reports = {"vllm": json.loads((eval_one / "eval_report.json").read_text()),
               "hf": json.loads((tmp_path / "hf" / "eval_report.json").read_text())}
    assert reports["vllm"]["settings"]["engine"] == "vllm" and reports["hf"]["settings"]["engine"] == "hf"
    assert "engine = vllm" in table(reports["vllm"])
    assert _responses(eval_one) == _responses(tmp_path / "hf")
    _same_report(reports["vllm"], reports["hf"])
    # the hf engine does not resume the vllm engine's responses
    capsys.readouterr()
    assert cli_main(_eval(world, eval_one, "hf")) == 2
    assert "responses.jsonl" in capsys.readouterr().err


@needs_vllm
def test_star_end_to_end_equals_shared(world, star_one, tmp_path):
    assert cli_main(_star(world, tmp_path / "shared.jsonl", "shared")) == 0
    got, want = ([json.loads(line) for line in p.read_text().splitlines()] for p in (star_one, tmp_path / "shared.jsonl"))
    assert len(got) == len(world["rows"])
    for a, b in zip(got, want):
        assert a["star_values"] == pytest.approx(b["star_values"], abs=TOL)


# ---- data parallel with real engines: two replicas on one core each --------------------------------------------
_KILL_ON_SECOND_CALL = """
import json, multiprocessing, os, signal, sys
from safeshape.eval import vllm_engine
calls, generate = [0], vllm_engine.VllmPolicy.generate_ids
def hooked(self, *a, **k):
    calls[0] += 1
    if calls[0] == 2:  # the first call's responses are saved; the replicas are at work: kill -9 the run
        with open(sys.argv[1], "w") as f:
            json.dump([p.pid for p in multiprocessing.active_children()], f)
        os.kill(os.getpid(), signal.SIGKILL)
    return generate(self, *a, **k)
vllm_engine.VllmPolicy.generate_ids = hooked
from safeshape.cli import main
sys.exit(main(sys.argv[2:]))
"""


@needs_vllm
def test_eval_data_parallel_resumes_and_equals_one_engine(world, eval_one, tmp_path):
    """`--data-parallel-size 2` killed with SIGKILL after its first call (its replicas end with it), then resumed:
    the responses and the report are one engine's."""
    import subprocess
    import sys

    import psutil

    out, pids = tmp_path / "dp", tmp_path / "replicas.json"
    args = _eval(world, out, "vllm") + ["--data-parallel-size", "2"]
    run = subprocess.run([sys.executable, "-c", _KILL_ON_SECOND_CALL, str(pids), *args])
    assert run.returncode == -9
    replicas = [psutil.Process(p) for p in json.loads(pids.read_text()) if psutil.pid_exists(p)]
    assert len(json.loads(pids.read_text())) == 2
    _, alive = psutil.wait_procs(replicas, timeout=300)  # they get SIGKILL with their parent; 300 s: a hang guard only
    assert not alive, "a replica outlived the killed run"
    saved = (out / "responses.jsonl").read_text().splitlines()[1:]
    assert 0 < len(saved) < 2 * len(world["prompts"])
    assert cli_main(args) == 0
    report = json.loads((out / "eval_report.json").read_text())
    assert report["settings"]["data_parallel_size"] == 2
    assert sum(m["generation"]["resumed"] for m in report["models"]) == len(saved)
    assert _responses(out) == _responses(eval_one)
    _same_report(report, json.loads((eval_one / "eval_report.json").read_text()))


@needs_vllm
def test_star_data_parallel_equals_one_engine(world, star_one, tmp_path):
    out = tmp_path / "dp.jsonl"
    assert cli_main(_star(world, out, "vllm") + ["--data-parallel-size", "2", "--batch-size", "4"]) == 0
    got, want = ([json.loads(line) for line in p.read_text().splitlines()] for p in (out, star_one))
    assert [r["prompt"] for r in got] == [r["prompt"] for r in want]
    for a, b in zip(got, want, strict=True):
        assert a["star_values"] == pytest.approx(b["star_values"], abs=TOL)


def _args(tmp_path, command):
    if command == "eval":
        return ["eval", "--model", str(tmp_path / "m"), "--harmful", str(tmp_path / "d.jsonl"), "--out",
                str(tmp_path / "o")]
    return ["star", "--guard", str(tmp_path / "m"), "--data", str(tmp_path / "d.jsonl"), "--out", str(tmp_path / "o")]


@pytest.mark.parametrize("command", ["eval", "star"])
def test_data_parallel_needs_the_vllm_engine(tmp_path, capsys, command):
    engine = "hf" if command == "eval" else "shared"
    assert cli_main(_args(tmp_path, command) + ["--engine", engine, "--data-parallel-size", "2"]) == 2
    assert "--data-parallel-size is for --engine vllm" in capsys.readouterr().err
    assert not (tmp_path / "o").exists()


@pytest.mark.parametrize("command", [pytest.param("eval", marks=needs_vllm), "star"])  # eval: vLLM checked first
def test_torchrun_with_vllm_points_at_data_parallel(tmp_path, capsys, monkeypatch, command):
    from safeshape.vllm_support import TORCHRUN

    monkeypatch.setenv("WORLD_SIZE", "2")
    assert cli_main(_args(tmp_path, command) + ["--engine", "vllm"]) == 2
    assert TORCHRUN in capsys.readouterr().err and "--data-parallel-size N" in TORCHRUN
    assert not (tmp_path / "o").exists()


# ---- data parallel: the replicas' machinery on a stand-in engine (no vLLM; processes of a moment each) ------------
def _replicas(n=2, **kwargs):
    from safeshape.vllm_support import Replicas
    from tests.vllm_replica_fake import FakeEngine

    return Replicas(FakeEngine, kwargs, [{"FAKE_REPLICA": str(k), "CUDA_VISIBLE_DEVICES": str(k)} for k in range(n)],
                    "--engine vllm")


def test_replica_shards_come_back_in_order(monkeypatch):
    from safeshape.vllm_support import split

    assert split(7, 3) == [(0, 3), (3, 5), (5, 7)] and split(1, 3) == [(0, 1), (1, 1), (1, 1)]
    monkeypatch.setenv("VLLM_DP_SIZE", "4")  # vLLM's own DP coordination: not passed on to independent replicas
    pool = _replicas(3)
    try:
        items = list(range(10))
        for count in (10, 2, 0):
            shards = [(items[lo:hi], "t") if hi > lo else None for lo, hi in split(count, len(pool))]
            answers = pool.call("echo", shards)
            assert [x for a in answers if a is not None for x, _, _ in a] == items[:count]
            assert [r for a in answers if a is not None for _, _, r in a] == \
                [k for k, (lo, hi) in enumerate(split(count, 3)) for _ in range(lo, hi)]  # replica k: shard k
        envs = pool.call("environment", [()] * 3)
        assert [e["CUDA_VISIBLE_DEVICES"] for e in envs] == ["0", "1", "2"]
        assert all(e["VLLM_DP_SIZE"] is None for e in envs)
    finally:
        pool.close()
    assert all(p.exitcode == 0 for p in pool.procs)  # closed: each replica left on its own
    assert os.environ["VLLM_DP_SIZE"] == "4" and "FAKE_REPLICA" not in os.environ  # the parent's environment kept


@pytest.mark.parametrize("how, message", [
    ("raise", r"replica 1 of 2 \(FAKE_REPLICA=1 CUDA_VISIBLE_DEVICES=1\) failed: RuntimeError: the engine broke on "
              r"item 'b'"),
    ("exit", r"replica 1 of 2 .* failed: the process exited with code 3"),
    ("kill-hang", r"replica 1 of 2 .* failed: the process was killed by SIGKILL"),
])
def test_a_failing_replica_stops_the_run_with_its_error(how, message):
    """Replica 1 raises, exits or is killed; replica 0 answers, or (kill-hang) never does: the parent raises replica
    1's error either way (it waits on events, not time) and stops every replica."""
    pool = _replicas(2)
    with pytest.raises(SafeshapeError, match=r"--engine vllm: data-parallel " + message):
        pool.call("fail", [(["a"], how), (["b"], how)])
    assert all(not p.is_alive() for p in pool.procs)


def test_a_replica_that_cannot_start_is_a_clear_error():
    with pytest.raises(SafeshapeError, match=r"replica 1 of 2 .* failed: ValueError: replica 1 cannot start"):
        _replicas(2, fail_start=1)


def test_more_replicas_than_devices_is_a_clear_error(monkeypatch):
    from safeshape import vllm_support

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(vllm_support.os, "sched_getaffinity", lambda pid: {4, 5, 6, 7, 8, 9, 10, 11})
    assert vllm_support.replica_environments(2, 2) == [{"VLLM_CPU_OMP_THREADS_BIND": "4,5|6,7"},
                                                       {"VLLM_CPU_OMP_THREADS_BIND": "8,9|10,11"}]
    assert vllm_support.replica_environments(3) == [{"VLLM_CPU_OMP_THREADS_BIND": c} for c in
                                                    ("4,5,6", "7,8,9", "10,11")]
    assert vllm_support.replica_environments(1, 64) == [{}]  # one engine: vLLM checks its tensor parallelism
    with pytest.raises(SafeshapeError, match=r"--data-parallel-size 3 x --tensor-parallel-size 3 needs 9 CPU cores "
                                             r"\(one per engine rank; no CUDA device is available\), but this "
                                             r"process may run on 8"):
        vllm_support.replica_environments(3, 3)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 4)
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,2,1,0")
    assert vllm_support.replica_environments(2, 2) == [{"CUDA_VISIBLE_DEVICES": "3,2"}, {"CUDA_VISIBLE_DEVICES": "1,0"}]
    with pytest.raises(SafeshapeError, match=r"--data-parallel-size 5 needs 5 CUDA devices \(one engine replica per "
                                             r"1 device\(s\)\), but 4 are visible"):
        vllm_support.replica_environments(5)
    for bad in (0, -1, True):
        with pytest.raises(SafeshapeError, match="--data-parallel-size must be a positive integer"):
            vllm_support.replica_environments(bad)


def test_eval_closes_its_engines_when_a_step_fails(monkeypatch):
    """A failure while generating or judging must not leave a vLLM engine (and its replicas) running until Python
    exits: eval closes the policy's and the guard's engine on the way out. Runs without vLLM (stand-in engines)."""
    from types import SimpleNamespace

    from safeshape.eval import run

    closed = []

    class Engine:
        def __init__(self, name):
            self.name = name

        def close(self):
            closed.append(self.name)

    monkeypatch.setattr(run.vllm_engine, "load_policy", lambda cfg, model, adapters: (Engine(model), None))

    def boom(*a, **k):
        raise RuntimeError("generation failed")

    monkeypatch.setattr(run, "_generate_model", boom)
    cfg = SimpleNamespace(engine="vllm")
    specs = [SimpleNamespace(name="base", model="M", adapter=None)]
    with pytest.raises(RuntimeError, match="generation failed"):
        run._generate_all(cfg, None, [], specs, {"base": None}, {}, {}, None, None,
                          SimpleNamespace(is_main=True, device="cpu"), print)
    assert closed == ["M"]

    monkeypatch.setattr(run.vllm_engine, "load_guard", lambda cfg: (Engine("guard"), None))
    monkeypatch.setattr(run, "GuardJudge", lambda *a, **k: object())
    monkeypatch.setattr(run, "judge_responses", boom)
    cfg = SimpleNamespace(engine="vllm", guard="G", guard_batch_size=1, guard_temperature=1.0)
    with pytest.raises(RuntimeError, match="generation failed"):
        run._judge(cfg, None, [{"name": "base", "responses": {"harmful": ["r"]}}], ["h"], None, False)
    assert closed == ["M", "guard"]
