"""STAR against the real guard chat templates (Llama Guard 3 1B/8B, Granite Guardian 3.0/3.1) and the real Llama 3.2
tokenizer: every prefix's guard ids equal Hugging Face's (apply_chat_template, then the tokenizer, then the verdict
prefix), and both engines' P(safe) equal a plain forward over those ids, on a random guard with the real 128k
vocabulary. Our own template (tests/fixtures/guards, its tail starts with a blank line as Llama Guard 3's does)
runs wherever the tokenizer package is; the real ones are skipped where shared/fixtures/guards is absent. A missing
tokenizer package skips, except under SAFESHAPE_REQUIRE_TOKENIZER=1 (make test, CI), where it fails. (docs/math.md#star-exact-guard-input,
docs/math.md#star-shared-engine)"""
import datetime
import math

import pytest
import torch

from safeshape.errors import SafeshapeError
from safeshape.star import StarScorer, chunk_char_spans, get_preset, score_full_responses, score_response
from safeshape.star.template import GuardTemplate
from tests import star_common

one_thread = pytest.fixture(autouse=True)(star_common.one_thread)

# chunks that end in '.', ':', '?', '!', a quote, and chunks followed by a newline or a blank line
RESPONSES = [
    'Sure. Here: is it? Yes! I "said" it.\nThen a new line, "quoted" word\nand more:\n\n1. first? ok!',
    "I'm sorry, I can't help with that request. Is there anything else? Let me know!",
    'Step one: mix the water.\nStep two: wait "carefully"!\n\nDone?',
]
PROMPT = "How do I get into my neighbour's wifi network?"
# (fixture name, preset name, template kwargs the test passes to Hugging Face, content as parts)
TEMPLATES = [
    ("own-blank-tail", "llama-guard-3", {}, False),  # ours (tests/fixtures/guards): runs without the shared fixtures
    ("llama-guard-3-8b", "llama-guard-3", {}, False),
    ("llama-guard-3-1b", "llama-guard-3", {}, True),
    ("granite-guardian-3.0-2b", "granite-guardian-3", {"guardian_config": {"risk_name": "harm"}}, False),
    ("granite-guardian-3.1", "granite-guardian-3", {"guardian_config": {"risk_name": "harm"}}, False),
]


def hf_ids(tok, context, text, kwargs, parts, verdict_prefix):
    """Independently: the ids Hugging Face feeds the guard for [context..., assistant: text], then the verdict prefix."""
    def content(c):
        return [{"type": "text", "text": c}] if parts else c

    msgs = [{"role": m["role"], "content": content(m["content"])} for m in context]
    msgs.append({"role": "assistant", "content": content(text)})
    rendered = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True, **kwargs)
    ids = tok(rendered, add_special_tokens=False)["input_ids"]
    return ids + (tok(verdict_prefix, add_special_tokens=False)["input_ids"] if verdict_prefix else [])


def plain_p_safe(model, ids, safe_id, unsafe_id):
    with torch.no_grad():
        h = model.model(input_ids=torch.tensor([ids])).last_hidden_state[0, -1]
        logits = model.lm_head(h).double()
    return 1 / (1 + math.exp(-(logits[safe_id] - logits[unsafe_id]).item()))


@pytest.mark.parametrize("name, preset_name, kwargs, parts", TEMPLATES, ids=[t[0] for t in TEMPLATES])
def test_every_prefix_gets_the_hugging_face_ids_and_scores(name, preset_name, kwargs, parts):
    tok = star_common.llama3_tokenizer(star_common.guard_template(name))
    model = star_common.real_vocab_guard()
    preset = get_preset(preset_name)
    tpl = GuardTemplate(tok, preset)
    context = [{"role": "user", "content": PROMPT}]
    boundary_merges = 0
    for chunk_words in (1, 2, 3):
        for response in RESPONSES:
            spans = chunk_char_spans(response, chunk_words)
            gi = tpl.build(context, response, chunk_words)
            want_ids = [hf_ids(tok, context, response[spans[0][0]:end], kwargs, parts, preset.verdict_prefix)
                        for _, end in spans]
            assert [gi.prefix_ids(k) for k in range(1, len(spans) + 1)] == want_ids
            # the fix-up matters: the last body token of some prefix is merged with the template tail
            boundary_merges += sum(gi.shared[k] < len(gi.body) and gi.tails[k][0] != gi.body[gi.shared[k]]
                                   for k in range(len(spans) - 1))
            if chunk_words == 2:
                want = [plain_p_safe(model, ids, tpl.safe_id, tpl.unsafe_id) for ids in want_ids]
                for engine, tails in (("shared", "cached"), ("shared", "inline"), ("naive", "cached")):
                    scorer = StarScorer(model, tok, preset=preset, chunk_words=2, engine=engine, tails=tails,
                                        batch_size=5)
                    got = scorer.score([(context, response)])[0]
                    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5, (engine, tails)
                    assert scorer.stats["shared_fallbacks"] == 0
    if preset_name == "llama-guard-3":
        assert boundary_merges > 0  # '.\n\n', ':\n\n', '?\n\n' ... are single Llama 3 tokens


def test_full_response_score_is_the_plain_forward():
    tok = star_common.llama3_tokenizer(star_common.guard_template("llama-guard-3-8b"))
    model = star_common.real_vocab_guard()
    tpl = GuardTemplate(tok, get_preset("llama-guard-3"))
    items = [(PROMPT, r) for r in RESPONSES] + [(PROMPT, "  trailing space and newline  \n")]
    got = score_full_responses(model, tok, items, preset="llama-guard-3", batch_size=2)
    want = [plain_p_safe(model, hf_ids(tok, [{"role": "user", "content": p}], r, {}, False, "\n\n"), tpl.safe_id,
                         tpl.unsafe_id) for p, r in items]
    assert max(abs(a - b) for a, b in zip(got, want)) <= 1e-5
    # the last prefix of STAR is the full response (whitespace-trimmed by Llama Guard's template)
    star = score_response(model, tok, PROMPT, RESPONSES[0], chunk_words=4)
    assert star[-1] == pytest.approx(got[0], abs=1e-5)


def test_system_messages_are_not_shown_and_granite_never_takes_the_tools_branch():
    tok = star_common.llama3_tokenizer(star_common.guard_template("granite-guardian-3.1"))
    scorer = StarScorer(star_common.real_vocab_guard(), tok, preset="granite-guardian-3", chunk_words=3,
                        guard_date=datetime.date(2024, 12, 1))
    conversations = [
        [{"role": "system", "content": "You are a pirate."}, {"role": "user", "content": PROMPT}],  # 3 messages
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
         {"role": "user", "content": PROMPT}],
        [{"role": "user", "content": PROMPT}],
    ]
    built = [scorer.build(c, RESPONSES[1]) for c in conversations]
    assert scorer.stats["system_dropped"] == 1
    assert built[0].body == built[1].body == built[2].body  # all three show the guard [user: PROMPT, assistant]
    text = tok.decode(built[0].prefix_ids(built[0].num_prefixes))
    assert "Tools Available" not in text and "pirate" not in text
    assert "December 01, 2024" in text  # the pinned date


def test_granite_date_is_pinned_and_reproducible():
    tok = star_common.llama3_tokenizer(star_common.guard_template("granite-guardian-3.1"))
    model = star_common.real_vocab_guard()
    a = score_response(model, tok, PROMPT, RESPONSES[2], preset="granite-guardian-3",
                       guard_date=datetime.date(2024, 12, 1))
    b = score_response(model, tok, PROMPT, RESPONSES[2], preset="granite-guardian-3",
                       guard_date=datetime.date(2025, 6, 30))
    a2 = score_response(model, tok, PROMPT, RESPONSES[2], preset="granite-guardian-3",
                        guard_date=datetime.date(2024, 12, 1))
    assert a == a2 and a != b
    assert StarScorer(model, tok, preset="granite-guardian-3").template.guard_date == datetime.date.today()


def test_template_that_does_not_fit_the_preset_is_refused():
    model = star_common.real_vocab_guard()
    granite = star_common.llama3_tokenizer(star_common.guard_template("granite-guardian-3.1"))
    llama = star_common.llama3_tokenizer(star_common.guard_template("llama-guard-3-8b"))
    with pytest.raises(SafeshapeError, match="does not fit this guard"):
        score_response(model, granite, PROMPT, "Sure.", preset="llama-guard-3")
    with pytest.raises(SafeshapeError, match="does not fit this guard"):
        score_response(model, llama, PROMPT, "Sure.", preset="granite-guardian-3")
    with pytest.raises(SafeshapeError, match="Granite Guardian 3.3"):
        score_response(model, granite, PROMPT, "Sure.", preset="granite-guardian-3.3")


def test_llama_guard_1b_with_string_contents_is_detected():
    # Llama Guard 3 1B's template reads list-of-parts contents; strings render an empty conversation
    tok = star_common.llama3_tokenizer(star_common.guard_template("llama-guard-3-1b"))
    model = star_common.real_vocab_guard()
    with pytest.raises(SafeshapeError, match="string contents"):
        score_response(model, tok, PROMPT, "Sure.", preset=get_preset("llama-guard-3").__class__(
            safe="safe", unsafe="unsafe", verdict_prefix="\n\n", content_format="string", name="lg3-string"))
    # "auto" (the preset's default) finds the parts format, and the user turn is rendered
    gi = GuardTemplate(tok, get_preset("llama-guard-3")).build([{"role": "user", "content": PROMPT}], "Sure.", 5)
    assert PROMPT in tok.decode(gi.body)
