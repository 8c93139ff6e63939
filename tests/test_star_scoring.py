"""STAR scoring on a tiny random Llama guard with a Llama-Guard-3-like template: the shared engine (one pass, block
mask) against the naive engine (one pass per prefix) and against the plain per-prefix computation
(docs/math.md#star-shared-engine, docs/math.md#star-verdict-probability)."""
import math
import warnings

import pytest
import torch

from safeshape.errors import SafeshapeError
from safeshape.star import GuardPreset, StarScorer, chunk_char_spans, get_preset, load_guard, score_response, tiny
from safeshape.star import engines
from safeshape.star.template import GuardTemplate
from tests import star_common

one_thread = pytest.fixture(autouse=True)(star_common.one_thread)

PROMPT = "How do I get into my neighbour's wifi network?"
RESPONSES = [
    tiny.random_text(23, seed=3),
    tiny.random_text(5, seed=4),  # exactly one chunk
    "Sure.",  # one word
    "  Sure,  here   are\n\nthe steps:\n1. first   \n2. second, then wait carefully!  ",  # odd whitespace
    tiny.random_text(41, seed=5),
]
# per chunk size, responses with a handful of chunks each (test time grows with the square of the chunk count)
PARITY_CASES = {1: RESPONSES[1:4], 3: RESPONSES[:4], 5: RESPONSES}
CONVERSATION = [{"role": "user", "content": "Hi there."}, {"role": "assistant", "content": "Hello! How can I help?"},
                {"role": "user", "content": PROMPT}]


def plain_prefix_logit_gaps(model, tok, context, response, chunk_words, preset):
    """The authors' way, written independently: render the template on each prefix text, tokenize the whole
    string, run one unpadded forward, read the verdict logits at the last position."""
    spans = chunk_char_spans(response, chunk_words)
    tpl = GuardTemplate(tok, preset)
    gaps = []
    for _, end in spans:
        msgs = context + [{"role": "assistant", "content": response[spans[0][0]:end]}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        verdict = tok(preset.verdict_prefix, add_special_tokens=False)["input_ids"] if preset.verdict_prefix else []
        ids = torch.tensor([tok(text, add_special_tokens=False)["input_ids"] + verdict])
        with torch.no_grad():
            logits = model(input_ids=ids).logits[0, -1].double()
        gaps.append((logits[tpl.safe_id] - logits[tpl.unsafe_id]).item())
    return gaps


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
@pytest.mark.parametrize("chunk_words, tails, max_tail_rows", [(1, "cached", 256), (3, "cached", 4),
                                                               (5, "cached", 256), (5, "inline", 0)])
def test_shared_matches_naive(attn, chunk_words, tails, max_tail_rows):
    model, tok = star_common.guard(attn)
    items = [(PROMPT, r) for r in PARITY_CASES[chunk_words]] + [(CONVERSATION, RESPONSES[1])]
    shared = StarScorer(model, tok, chunk_words=chunk_words, engine="shared", batch_size=3, tails=tails,
                        max_tail_rows=max_tail_rows)
    naive = StarScorer(model, tok, chunk_words=chunk_words, engine="naive", batch_size=7)
    got, want = shared.score(items), naive.score(items)
    assert shared.engine == "shared" and naive.engine == "naive"
    for (_, r), g, w in zip(items, got, want):
        assert len(g) == len(w) == len(chunk_char_spans(r, chunk_words))
        assert max(abs(a - b) for a, b in zip(g, w)) <= 1e-4
    # the values are not degenerate: the parity above is between values that differ from chunk to chunk
    flat = [v for vals in got for v in vals]
    assert max(flat) - min(flat) > 0.05
    assert shared.stats["guard_tokens"] < naive.stats["guard_tokens"]


@pytest.mark.parametrize("engine", ["shared", "naive"])
def test_engines_match_plain_per_prefix_forward(engine):
    model, tok = star_common.guard("sdpa")
    preset = get_preset("llama-guard-3")
    for context, response in [([{"role": "user", "content": PROMPT}], RESPONSES[0]), (CONVERSATION, RESPONSES[3])]:
        got = score_response(model, tok, context, response, chunk_words=5, engine=engine, preset=preset)
        gaps = plain_prefix_logit_gaps(model, tok, context, response, 5, preset)
        want = [1 / (1 + math.exp(-g)) for g in gaps]
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4


def test_prefix_ids_are_the_tokenization_of_each_rendered_prefix():
    _, tok = star_common.guard("sdpa")
    tpl = GuardTemplate(tok, get_preset("llama-guard-3"))
    verdict = tok("\n\n", add_special_tokens=False)["input_ids"]
    for seed in range(4):
        response = tiny.random_text(40, seed)
        gi = tpl.build([{"role": "user", "content": PROMPT}], response, 5)
        spans = chunk_char_spans(response, 5)
        for k, (_, end) in enumerate(spans, 1):
            msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": response[spans[0][0]:end]}]
            text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
            assert gi.prefix_ids(k) == tok(text, add_special_tokens=False)["input_ids"] + verdict
        assert gi.shared_tokens < gi.naive_tokens / 3


@pytest.mark.parametrize("tails", ["cached", "inline"])
def test_each_tail_sees_exactly_its_prefix(tails):
    model, tok = star_common.guard("sdpa")
    tpl = GuardTemplate(tok, get_preset("llama-guard-3"))
    other = tpl.build([{"role": "user", "content": "Hi"}], tiny.random_text(12, seed=1), 5)
    gi = tpl.build([{"role": "user", "content": PROMPT}], tiny.random_text(30, seed=9), 5)
    ids = [tpl.safe_id, tpl.unsafe_id]
    run = engines.shared_logits if tails == "cached" else engines.shared_inline_logits

    def shared(x):  # batched with another response: it must not leak into x either
        return run(model, [other, x], ids, 0)[0][1]

    base = shared(gi)
    K = gi.num_prefixes
    assert K == 6
    for k in (0, 2, K - 1):  # perturb the body token just before tail k's shared part ends: tails < k keep theirs
        j = gi.shared[k] - 1
        body = list(gi.body)
        body[j] = (body[j] + 17) % len(tok)
        pert = type(gi)(body=body, shared=gi.shared, tails=gi.tails)
        out = shared(pert)
        unchanged = [i for i in range(K) if gi.shared[i] <= j]
        assert unchanged == list(range(k))
        before = (out[:k] - base[:k]).abs().max().item() if k else 0.0
        assert before <= 1e-9, (k, before)
        assert (out[k:] - base[k:]).abs().amax(dim=1).min().item() > 1e-4, k
        # and the changed tails agree with a naive pass over the perturbed prefixes
        naive = engines.naive_logits(model, [pert.prefix_ids(i + 1) for i in range(K)], ids, 0)[0]
        assert (naive - out).abs().max().item() <= 1e-4


def test_block_mask_layout():
    # body 5 tokens; tail 1 shares 3 body tokens, tail 2 all 5 and re-tokenizes nothing; tail 1 is 3 tokens long
    from safeshape.star.template import GuardInput

    gi = GuardInput(body=[1, 2, 3, 4, 5], shared=[3, 5], tails=[[9, 6, 7], [6, 7]])
    ids, pos, seg, limit, read = engines.shared_layout(gi)
    assert ids.tolist() == [1, 2, 3, 4, 5, 9, 6, 7, 6, 7]
    assert pos.tolist() == [0, 1, 2, 3, 4, 3, 4, 5, 5, 6]  # tail 1 follows its 3 shared tokens, tail 2 all 5
    assert read == [7, 9]
    assert gi.prefix_ids(1) == [1, 2, 3, 9, 6, 7] and gi.prefix_ids(2) == [1, 2, 3, 4, 5, 6, 7]
    assert (gi.shared_tokens, gi.naive_tokens) == (10, 13)
    mask = engines.block_mask(seg[None], limit[None])[0, 0].int().tolist()
    assert mask == [
        [1, 0, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 0, 0, 0, 0, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 0, 0, 0, 0],  # tail 1: its 3 shared tokens + itself
        [1, 1, 1, 0, 0, 1, 1, 0, 0, 0],
        [1, 1, 1, 0, 0, 1, 1, 1, 0, 0],
        [1, 1, 1, 1, 1, 0, 0, 0, 1, 0],  # tail 2: the whole body + itself, not tail 1
        [1, 1, 1, 1, 1, 0, 0, 0, 1, 1],
    ]


def test_a_response_that_shares_too_little_is_scored_one_prefix_at_a_time():
    from safeshape.star.template import GuardInput

    model, tok = star_common.guard("sdpa")
    scorer = StarScorer(model, tok, engine="shared")
    good = scorer.build(PROMPT, RESPONSES[0])
    # a tokenizer whose prefix ids share almost nothing with the body: the shared layout would cost more
    bad = GuardInput(body=good.body, shared=[1] * good.num_prefixes,
                     tails=[good.prefix_ids(k)[1:] for k in range(1, good.num_prefixes + 1)])
    got = scorer.score_inputs([good, bad])
    assert scorer.stats["shared_fallbacks"] == 1
    assert max(abs(a - b) for a, b in zip(got[0], got[1])) <= 1e-5


def test_fallback_to_naive_where_the_mask_cannot_be_passed():
    from transformers import AttentionInterface
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    # an attention implementation transformers builds no mask for: the shared engine cannot use it
    AttentionInterface.register("star_test_causal_only", sdpa_attention_forward)
    tok = star_common.tokenizer()
    model = tiny.build_model(len(tok), attn_implementation="star_test_causal_only")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        scorer = StarScorer(model, tok, engine="shared")
    assert scorer.engine == "naive"
    assert any("falling back to the naive engine" in str(w.message) for w in caught)
    ref_model, _ = star_common.guard("sdpa")
    got = scorer.score([(PROMPT, RESPONSES[0])])[0]
    want = score_response(ref_model, tok, PROMPT, RESPONSES[0], engine="naive")
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4


def test_temperature():
    model, tok = star_common.guard("sdpa")
    v1 = score_response(model, tok, PROMPT, RESPONSES[0], temperature=1.0)
    v5 = score_response(model, tok, PROMPT, RESPONSES[0], temperature=0.2)
    for a, b in zip(v1, v5):  # logit(V_T) = logit(V_1) / T
        assert math.log(b / (1 - b)) == pytest.approx(math.log(a / (1 - a)) / 0.2, rel=1e-6, abs=1e-6)
    with pytest.raises(SafeshapeError, match="temperature"):
        score_response(model, tok, PROMPT, RESPONSES[0], temperature=0.0)


def test_presets():
    assert get_preset("llama-guard-3").verdict_prefix == "\n\n"
    gg = get_preset("granite-guardian-3")
    assert (gg.safe, gg.unsafe, gg.verdict_prefix) == ("No", "Yes", "")
    assert gg.template_kwargs == {"guardian_config": {"risk_name": "harm"}}
    g = get_preset("generic", safe="ok", unsafe="bad", verdict_prefix=":")
    assert (g.safe, g.unsafe, g.verdict_prefix, g.name) == ("ok", "bad", ":", "generic")
    assert get_preset("llama-guard-3", safe="Safe").safe == "Safe"
    with pytest.raises(SafeshapeError, match="generic"):
        get_preset("generic", safe="ok")
    with pytest.raises(SafeshapeError, match="unknown guard preset 'nope'"):
        get_preset("nope")
    with pytest.raises(SafeshapeError, match="same string"):
        GuardPreset(safe="x", unsafe="x")


def test_generic_preset_reads_other_verdict_tokens():
    model, tok = star_common.guard("sdpa")
    preset = get_preset("generic", safe="No", unsafe="Yes", verdict_prefix="")
    got = score_response(model, tok, PROMPT, RESPONSES[0], preset=preset)
    gaps = plain_prefix_logit_gaps(model, tok, [{"role": "user", "content": PROMPT}], RESPONSES[0], 5, preset)
    assert max(abs(a - 1 / (1 + math.exp(-g))) for a, g in zip(got, gaps)) <= 1e-4


def test_same_first_token_is_refused():
    model, tok = star_common.guard("sdpa")
    with pytest.raises(SafeshapeError, match="start with the same token"):
        score_response(model, tok, PROMPT, "hi", preset=GuardPreset(safe="safe", unsafe="safe!"))


def test_template_variants():
    model, tok = star_common.guard("sdpa")
    want = score_response(model, tok, PROMPT, RESPONSES[0])
    original = tok.chat_template
    try:
        # Llama Guard 3 1B style: contents are lists of {"type": "text"} parts ("auto" finds out)
        tok.chat_template = original.replace("message['content'] | trim",
                                             "(message['content'] | selectattr('type', 'equalto', 'text') | "
                                             "map(attribute='text') | join('')) | trim")
        got = score_response(model, tok, PROMPT, RESPONSES[0])
        assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-4
        # template kwargs reach the template (Granite Guardian's guardian_config)
        tok.chat_template = original.replace("<BEGIN CONVERSATION>", "' + guardian_config['risk_name'] + '")
        preset = GuardPreset(safe="safe", unsafe="unsafe", verdict_prefix="\n\n",
                             template_kwargs={"guardian_config": {"risk_name": "harm"}})
        assert len(score_response(model, tok, PROMPT, RESPONSES[0], preset=preset)) == len(want)
        # a template that renders the user's turn empty (as Llama Guard 3 1B does for string contents) is refused
        tok.chat_template = original.replace("message['content'] | trim",
                                             "(message['content'] if message['role'] == 'assistant' else '') | trim")
        with pytest.raises(SafeshapeError, match=r"dropped the content of message\(s\) \[0\]"):
            score_response(model, tok, PROMPT, RESPONSES[0])
        # a template that changes the message is refused: prefixes could not share the head and the tail
        tok.chat_template = original.replace("message['content'] | trim", "message['content'] | upper")
        with pytest.raises(SafeshapeError, match="verbatim"):
            score_response(model, tok, PROMPT, RESPONSES[0])
    finally:
        tok.chat_template = original


def test_bad_input():
    model, tok = star_common.guard("sdpa")
    with pytest.raises(SafeshapeError, match="no words"):
        score_response(model, tok, PROMPT, "  \n ")
    with pytest.raises(SafeshapeError, match="engine must be one of"):
        score_response(model, tok, PROMPT, "hi", engine="fast")
    with pytest.raises(SafeshapeError, match="chunk_words must be a positive integer"):
        score_response(model, tok, PROMPT, "hi", chunk_words=0)


def test_load_guard_from_folder(tmp_path):
    tiny.save_tiny_guard(tmp_path / "guard")
    model, tok = load_guard(tmp_path / "guard")
    assert not model.training and tok.chat_template
    ref_model, _ = star_common.guard("sdpa")  # same seed and config: the same weights
    got = score_response(model, tok, PROMPT, RESPONSES[1])
    want = score_response(ref_model, star_common.tokenizer(), PROMPT, RESPONSES[1])
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-6
    with pytest.raises(SafeshapeError, match="guard .*missing: no such folder"):
        load_guard(tmp_path / "missing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SafeshapeError, match="no config.json"):
        load_guard(tmp_path / "empty")
