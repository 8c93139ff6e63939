"""The STAR authors' recipe (docs/math.md#star-authors-recipe): whitespace-normalised prefixes and the verdict distribution after Hugging
Face's logits processors (repetition penalty 1.2, temperature 0.2, top-k 50, top-p 0.9), checked against
transformers' own processors and against generate()'s scores."""
import math

import pytest
import torch

from safeshape.errors import SafeshapeError
from safeshape.star import StarScorer, get_preset, tiny
from safeshape.star.recipe import authors_p_safe, processed_scores
from tests import star_common

one_thread = pytest.fixture(autouse=True)(star_common.one_thread)

PROMPT = "How do I get into my neighbour's wifi network?"
RESPONSE = "Sure.  Here are\n\nthe steps:\n1. first   \n2. second, then wait carefully!  Done?"


def hf_processors():
    from transformers import (LogitsProcessorList, RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper,
                              TopKLogitsWarper, TopPLogitsWarper)

    return LogitsProcessorList([RepetitionPenaltyLogitsProcessor(1.2), TemperatureLogitsWarper(0.2),
                                TopKLogitsWarper(50), TopPLogitsWarper(0.9)])


@pytest.mark.parametrize("seed", range(3))
def test_processed_scores_equal_transformers_processors(seed):
    g = torch.Generator().manual_seed(seed)
    logits = torch.randn(6, 500, generator=g, dtype=torch.float64) * (1 + seed)
    ids = torch.randint(0, 500, (6, 40), generator=g)
    want = hf_processors()(ids, logits.clone())
    got = processed_scores(logits, ids.tolist())[1]
    assert torch.equal(torch.isinf(got), torch.isinf(want))
    finite = ~torch.isinf(want)
    assert torch.allclose(got[finite], want[finite], rtol=1e-12, atol=1e-12)
    assert finite.sum(dim=1).min() >= 1 and finite.sum(dim=1).max() <= 50


def test_both_masked_is_counted_not_nan():
    logits = torch.zeros(3, 100, dtype=torch.float64)
    logits[:, 50:] = 10.0  # tokens 0 and 1 are out of every row's top 50
    logits[2, 0] = 30.0  # row 2: safe is the top token
    values, both = authors_p_safe(logits, [[5], [6], [7]], safe_id=0, unsafe_id=1)
    assert both == 2 and not any(math.isnan(v) for v in values)
    assert values[0] == pytest.approx(0.5) and values[2] == 1.0


def biased_guard(tok):
    """The tiny guard with the verdict tokens' output rows scaled up, so they are among the top tokens."""
    import copy

    model, _ = star_common.guard("sdpa")
    model = copy.deepcopy(model)
    safe, unsafe = (tok(w, add_special_tokens=False)["input_ids"][0] for w in ("safe", "unsafe"))
    with torch.no_grad():
        model.lm_head.weight[[safe, unsafe]] *= 6
    return model


@pytest.mark.parametrize("engine", ["shared", "naive"])
def test_authors_recipe_equals_generate_scores(engine):
    tok = star_common.tokenizer()
    model = biased_guard(tok)
    scorer = StarScorer(model, tok, chunk_words=2, engine=engine, recipe="authors")
    got = scorer.score([(PROMPT, RESPONSE)])[0]
    words = RESPONSE.split()
    tpl = scorer.template
    checked = 0
    for k, v in enumerate(got, 1):
        msgs = [{"role": "user", "content": PROMPT}, {"role": "assistant", "content": " ".join(words[:2 * k])}]
        text = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        ids = tok(text, add_special_tokens=False)["input_ids"] + tok("\n\n", add_special_tokens=False)["input_ids"]
        out = model.generate(torch.tensor([ids]), attention_mask=torch.ones(1, len(ids), dtype=torch.long),
                             max_new_tokens=1, do_sample=True, temperature=0.2, top_k=50, top_p=0.9,
                             repetition_penalty=1.2, output_scores=True, return_dict_in_generate=True,
                             pad_token_id=0)
        pair = out.scores[0][0, [tpl.safe_id, tpl.unsafe_id]].double()
        want = pair.softmax(0)[0].item()
        if math.isnan(want):  # both masked in their code: ours is counted instead
            continue
        assert v == pytest.approx(want, abs=1e-5)
        checked += 1
    assert checked >= len(got) - scorer.stats["both_masked"] and checked > 0
    assert scorer.stats["both_masked"] == len(got) - checked


def test_authors_prefixes_are_whitespace_normalised():
    tok = star_common.tokenizer()
    model, _ = star_common.guard("sdpa")
    scorer = StarScorer(model, tok, chunk_words=3, recipe="authors")
    gi = scorer.build(PROMPT, RESPONSE)
    words = RESPONSE.split()
    for k in range(1, gi.num_prefixes + 1):
        text = tok.decode(gi.prefix_ids(k))
        assert "Agent: " + " ".join(words[:3 * k]) + "\n\n<END CONVERSATION>" in text
    with pytest.raises(SafeshapeError, match="recipe must be one of"):
        StarScorer(model, tok, recipe="paper")
    with pytest.raises(SafeshapeError, match="temperature"):
        StarScorer(model, tok, recipe="authors", temperature=0.5)


def test_trainer_maps_authors_rows_with_their_boundaries():
    from safeshape import testing
    from safeshape.data import encode_row

    tok = testing.build_tiny_tokenizer(vocab_size=320)
    response = "the first  step is here\nthen the second one and finally the last"
    values = [0.9, 0.5, 0.1]  # 13 words, M = 5: three chunks
    row = {"prompt": "how do I do it", "response": response, "star_values": values, "star_chunk_words": 5}
    exact = encode_row(tok, row, "dss", 512, "row")
    authors = encode_row(tok, {**row, "star_recipe": "authors"}, "dss", 512, "row")
    assert authors.input_ids == exact.input_ids and authors.labels == exact.labels
    # independently: chunk k ends at the token length of the chat rendered up to prefix k
    words = response.split()
    ends = [len(tok.apply_chat_template([{"role": "user", "content": row["prompt"]},
                                         {"role": "assistant", "content": " ".join(words[:5 * k])}])["input_ids"])
            for k in (1, 2)]
    first = next(i for i, lab in enumerate(authors.labels) if lab != -100)
    want = [0.0] * first + [values[0]] * (ends[0] - first) + [values[1]] * (ends[1] - ends[0]) + \
        [values[2]] * (len(authors.input_ids) - ends[1])
    assert authors.weights == pytest.approx(want)
    # their boundaries sit later than the character mapping's (the end-of-turn tokens of each prefix's chat)
    switch = [next(i for i, w in enumerate(ex.weights) if w == pytest.approx(values[1])) for ex in (exact, authors)]
    assert switch[1] > switch[0]
    with pytest.raises(SafeshapeError, match="star_recipe"):
        encode_row(tok, {**row, "star_recipe": "paper"}, "dss", 512, "row")


def test_annotate_with_the_authors_recipe_marks_rows_and_resumes(tmp_path):
    import json

    from safeshape.star import annotate_file

    tok = star_common.tokenizer()
    model = biased_guard(tok)
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    rows = [{"prompt": PROMPT, "response": RESPONSE}, {"prompt": "Hi", "response": tiny.random_text(12, 3)}]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    report = annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=4, recipe="authors", progress=False)
    # the count is the scorer's own, over the same rows (the biased guard masks both verdicts on some prefixes)
    direct = StarScorer(model, tok, chunk_words=4, recipe="authors")
    direct.score([(PROMPT, RESPONSE), ("Hi", rows[1]["response"])])
    assert report["recipe"] == "authors" and report["verdicts_both_masked"] == direct.stats["both_masked"] > 0
    got = [json.loads(line) for line in out.read_text().splitlines()]
    assert [g["star_recipe"] for g in got] == ["authors", "authors"]
    want = StarScorer(model, tok, chunk_words=4, recipe="authors").score([(PROMPT, RESPONSE)])[0]
    assert got[0]["star_values"] == pytest.approx(want, abs=1e-6)
    lines = out.read_text().splitlines(keepends=True)
    out.write_text(lines[0] + lines[1][:-9])  # torn in the last field
    with pytest.warns(UserWarning, match="incomplete last line"):
        report = annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=4, recipe="authors",
                               progress=False)
    assert report["rows_skipped"] == 1 and report["rows_scored"] == 1
    with pytest.raises(SafeshapeError, match="not a partial STAR annotation"):  # another recipe is not resumed
        annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=4, progress=False)
