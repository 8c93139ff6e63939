"""Chunk spans and per-token STAR weights for the trainer (docs/math.md#star-chunks-and-prefixes,
docs/math.md#star-token-weights)."""
import pytest
import torch

from safeshape.errors import SafeshapeError
from safeshape.star import chunk_char_spans, token_weights, tiny
from tests import star_common


def test_chunk_char_spans():
    text = "one two three four five six seven"
    assert chunk_char_spans(text, 5) == [(0, 23), (24, 33)]
    assert [text[s:e] for s, e in chunk_char_spans(text, 3)] == ["one two three", "four five six", "seven"]
    assert chunk_char_spans(text, 7) == [(0, 33)]
    assert chunk_char_spans(text, 100) == [(0, 33)]
    odd = "  a\tb\n\nc  d \u00a0e f  "
    assert [odd[s:e] for s, e in chunk_char_spans(odd, 2)] == ["a\tb", "c  d", "e f"]
    assert chunk_char_spans("", 5) == [] and chunk_char_spans(" \n ", 5) == []
    # the number of chunks is ceil(words / M), with words as str.split() counts them
    for seed in range(5):
        t = tiny.random_text(37, seed)
        spans = chunk_char_spans(t, 4)
        assert len(spans) == -(-len(t.split()) // 4)
        assert [t[s:e].split() for s, e in spans] == [t.split()[i:i + 4] for i in range(0, len(t.split()), 4)]
    with pytest.raises(SafeshapeError, match="chunk_words must be a positive integer"):
        chunk_char_spans(text, 0)


def expected_weights(offsets, response_start, response, values, chunk_words):
    """The rules, one token at a time, from the full-text offsets."""
    spans = [(s + response_start, e + response_start) for s, e in chunk_char_spans(response, chunk_words)]
    text_end = response_start + len(response)
    out, started, current = [], False, 0
    for s, e in offsets:
        if not started and e <= response_start:
            out.append(0.0)
            continue
        started = True
        key = None  # first non-space character of the token inside the response, else the next one after it
        for i in range(max(s, response_start), text_end):
            if not response[i - response_start].isspace():
                key = i
                break
        if key is None:
            key = text_end
        chunk = next((k for k, (_, ce) in enumerate(spans) if key < ce), len(spans) - 1)
        current = max(current, chunk)  # monotone in token order
        out.append(values[current])
    return torch.tensor(out, dtype=torch.float32)


@pytest.mark.parametrize("seed", range(4))
@pytest.mark.parametrize("chunk_words", [1, 3, 5])
def test_token_weights_on_a_real_tokenization(seed, chunk_words):
    tok = star_common.tokenizer()
    response = tiny.random_text(20 + 7 * seed, seed)
    if seed == 3:
        response = "  " + response + " \n"  # stray leading and trailing whitespace
    prefix = "<|start_header_id|>user<|end_header_id|>\n\nHow do I do it?<|eot_id|><|start_header_id|>assistant" \
             "<|end_header_id|>\n\n"
    text = prefix + response + "<|eot_id|>"
    enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    offsets = enc["offset_mapping"]
    k = len(chunk_char_spans(response, chunk_words))
    values = [0.01 + 0.9 * i / max(k, 1) for i in range(k)]
    got = token_weights(offsets, len(prefix), response, values, chunk_words)
    assert got.dtype == torch.float32 and got.shape == (len(offsets),)
    torch.testing.assert_close(got, expected_weights(offsets, len(prefix), response, values, chunk_words))
    # prompt tokens carry no loss; the end-of-turn token takes the last chunk's value
    n_prompt = sum(1 for _, e in offsets if e <= len(prefix))
    assert got[:n_prompt].eq(0).all() and got[n_prompt:].gt(0).all()
    assert got[-1].item() == pytest.approx(values[-1])


def test_token_weights_hand_made_offsets():
    # text: "Q: hi A: aa bb  cc\n\ndd<eot>" with response "aa bb  cc\n\ndd" starting at 9
    response = "aa bb  cc\n\ndd"
    rs = 9
    offsets = [(0, 2), (2, 5), (5, 8), (8, 11),  # "Q:", " hi", " A:", " aa" (straddles the response start)
               (11, 14),  # " bb"
               (14, 16),  # "  " (whitespace only: goes with the next word, cc)
               (16, 18),  # "cc"
               (18, 20),  # "\n\n" (goes with dd)
               (20, 22),  # "dd"
               (22, 27),  # "<eot>" after the response
               (0, 0)]  # a special token appended by the tokenizer
    got = token_weights(offsets, rs, response, [0.5, 0.25], chunk_words=2)  # chunks "aa bb", "cc\n\ndd"
    assert got.tolist() == [0.0, 0.0, 0.0, 0.5, 0.5, 0.25, 0.25, 0.25, 0.25, 0.25, 0.25]
    got = token_weights(offsets, rs, response, [0.5, 0.25, 0.75, 1.0], chunk_words=1)
    assert got.tolist() == [0.0, 0.0, 0.0, 0.5, 0.25, 0.75, 0.75, 1.0, 1.0, 1.0, 1.0]
    # a token spanning two chunks takes the chunk of its first non-space character
    got = token_weights([(0, 9), (9, 14), (14, 27)], rs, response, [0.5, 0.25, 0.75, 1.0], chunk_words=1)
    assert got.tolist() == [0.0, 0.5, 0.75]


def test_token_weights_errors_and_empty():
    with pytest.raises(SafeshapeError, match="values has 1 entries but the response has 2 chunks"):
        token_weights([(0, 3)], 0, "a b c d e f", [0.5], chunk_words=5)
    assert token_weights([(0, 1), (1, 2)], 1, "", [], chunk_words=5).tolist() == [0.0, 0.0]
    assert token_weights([], 0, "a b", [0.5], chunk_words=5).shape == (0,)
