"""Data loading for the trainer: chat-template rendering, prompt-masked labels, per-token weights
(docs/math.md#star-token-weights), clear errors."""
import json

import pytest
import torch

from safeshape import testing
from safeshape.data import IGNORE_INDEX, collate, encode_row, load_examples
from safeshape.errors import SafeshapeError


@pytest.fixture(scope="module")
def tokenizer():
    return testing.build_tiny_tokenizer(vocab_size=320)


def _write(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _response_text(tokenizer, ex):
    return tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])


@pytest.mark.parametrize("messages", [False, True])
def test_labels_cover_exactly_the_response(tokenizer, messages):
    row = testing.tiny_rows(1, "sft", seed=3, messages=messages)[0]
    response = row["messages"][-1]["content"] if messages else row["response"]
    ex = encode_row(tokenizer, row, "sft", 512, "row")
    first = next(i for i, t in enumerate(ex.labels) if t != IGNORE_INDEX)
    assert all(t == IGNORE_INDEX for t in ex.labels[:first])
    assert ex.labels[first:] == ex.input_ids[first:]
    # the labelled tokens are the response and the template's end-of-turn, nothing of the prompt
    assert _response_text(tokenizer, ex) == response + "<|end|>\n"
    assert ex.weights == [0.0] * first + [1.0] * (len(ex.labels) - first)


def test_multi_turn_messages_train_only_the_last_turn(tokenizer):
    row = {"messages": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there."},
                        {"role": "assistant", "content": "Hello friend."}, {"role": "user", "content": "Bye."},
                        {"role": "assistant", "content": "See you again."}]}
    ex = encode_row(tokenizer, row, "sft", 512, "row")
    assert _response_text(tokenizer, ex) == "See you again.<|end|>\n"


def test_rs_weights_follow_the_safe_flag(tokenizer):
    rows = testing.tiny_rows(2, "sft", seed=1)
    safe = encode_row(tokenizer, {**rows[0], "safe": True}, "rs", 512, "row")
    unsafe = encode_row(tokenizer, {**rows[1], "safe": False}, "rs", 512, "row")
    assert {w for w, t in zip(safe.weights, safe.labels) if t != IGNORE_INDEX} == {1.0}
    assert set(unsafe.weights) == {0.0}
    # rejected rows keep their labels: they count among the valid tokens (RS is w in {0, 1},
    # docs/math.md#sft-and-rejection-sampling)
    assert any(t != IGNORE_INDEX for t in unsafe.labels)


def test_dss_weights_are_star_values_on_response_tokens(tokenizer):
    row = {"prompt": "Tell me a story.", "response": "one two three four five six seven eight nine ten eleven",
           "star_values": [0.9, 0.2, 0.6], "star_chunk_words": 4}
    ex = encode_row(tokenizer, row, "dss", 512, "row")
    resp = [(t, w) for t, w in zip(ex.labels, ex.weights) if t != IGNORE_INDEX]
    prompt_w = [w for t, w in zip(ex.labels, ex.weights) if t == IGNORE_INDEX]
    assert set(prompt_w) == {0.0}
    # chunks in order: the weights of the response tokens run through the STAR values in order
    seen = []
    for _, w in resp:
        if not seen or seen[-1] != w:
            seen.append(w)
    assert seen[:3] == pytest.approx([0.9, 0.2, 0.6])
    text = tokenizer.decode([t for t, w in resp if w == pytest.approx(0.9)])
    assert text.split() == "one two three four".split()


def test_truncation_drops_rows_without_response_tokens(tokenizer, tmp_path):
    rows = testing.tiny_rows(3, "sft", seed=2)
    rows[1]["prompt"] = " ".join(["history"] * 200)
    examples, dropped = load_examples(_write(tmp_path / "d.jsonl", rows), tokenizer, "sft", 64)
    assert dropped == [2] and [e.line for e in examples] == [1, 3]
    assert all(len(e.input_ids) <= 64 for e in examples)


def test_collate_pads_right_and_ignores_padding(tokenizer):
    exs = [encode_row(tokenizer, r, "sft", 512, "row") for r in testing.tiny_rows(3, "sft", seed=4)]
    batch = collate(exs, pad_token_id=0)
    lengths = [len(e.input_ids) for e in exs]
    assert batch["input_ids"].shape == (3, max(lengths))
    assert batch["attention_mask"].sum(1).tolist() == lengths
    for i, n in enumerate(lengths):
        assert (batch["labels"][i, n:] == IGNORE_INDEX).all() and (batch["weights"][i, n:] == 0).all()
        assert batch["labels"][i, :n].tolist() == exs[i].labels
    assert batch["weights"].dtype == torch.float32


@pytest.mark.parametrize("loss, row, message", [
    ("dss", {"prompt": "a", "response": "b c"}, "line 1: --loss dss needs STAR fields, missing ['star_values', "
                                                "'star_chunk_words']"),
    ("dss", {"prompt": "a", "response": "b c d", "star_values": [0.5, 0.5], "star_chunk_words": 5},
     "has 2 values but the response has 1 chunks"),
    ("dss", {"prompt": "a", "response": "b", "star_values": [1.5], "star_chunk_words": 5}, "numbers in [0, 1]"),
    ("rs", {"prompt": "a", "response": "b"}, "line 1: --loss rs needs a boolean `safe` flag on every row (missing)"),
    ("rs", {"prompt": "a", "response": "b", "safe": "yes"}, "boolean `safe` flag"),
    ("sft", {"question": "a"}, "a row needs `prompt` and `response`, `messages`, or TRL's `prompt` and `completion`"),
    ("sft", {"messages": [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]},
     "the last message must be the assistant's response"),
])
def test_bad_rows_name_file_line_and_field(tokenizer, tmp_path, loss, row, message):
    path = _write(tmp_path / "bad.jsonl", [row])
    with pytest.raises(SafeshapeError) as err:
        load_examples(path, tokenizer, loss, 512)
    assert str(path) in str(err.value) and message in str(err.value)


def test_bad_json_names_the_line(tokenizer, tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps({"prompt": "a", "response": "b"}) + "\n{oops\n")
    with pytest.raises(SafeshapeError, match=r"bad.jsonl line 2: not valid JSON"):
        load_examples(path, tokenizer, "sft", 512)


def test_tokenizer_without_chat_template_is_refused(tmp_path):
    from safeshape.trainer.model import load_tokenizer

    tok = testing.build_tiny_tokenizer(vocab_size=320)
    tok.chat_template = None
    tok.save_pretrained(tmp_path / "tok")
    cfg = tmp_path / "tok" / "tokenizer_config.json"
    data = json.loads(cfg.read_text())
    data.pop("chat_template", None)
    cfg.write_text(json.dumps(data))
    (tmp_path / "tok" / "chat_template.jinja").unlink(missing_ok=True)
    with pytest.raises(SafeshapeError, match=r"tok: the tokenizer has no chat template"):
        load_tokenizer(str(tmp_path / "tok"))
