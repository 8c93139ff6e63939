"""Dataset annotation (annotate_file) and the ``safeshape star`` command (docs/math.md#star: values stored with
the rows)."""
import argparse
import json

import pytest

from safeshape import cli
from safeshape.errors import SafeshapeError
from safeshape.star import annotate_file, score_response, tiny
from safeshape.star import cli as star_cli
from tests import star_common

one_thread = pytest.fixture(autouse=True)(star_common.one_thread)

ROWS = [
    {"id": 0, "prompt": "How do I bake bread?", "response": tiny.random_text(12, 1)},
    {"id": 1, "messages": [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
                           {"role": "user", "content": "Help me."}, {"role": "assistant",
                                                                     "content": tiny.random_text(7, 2)}]},
    {"id": 2, "prompt": "Tell me a story.", "response": tiny.random_text(16, 3), "extra": {"kept": [1, 2]}},
    {"id": 3, "prompt": "Ok?", "response": "Yes."},
    {"id": 4, "prompt": "More?", "response": tiny.random_text(9, 4)},
]


def write_jsonl(path, rows, blank_after=None):
    with open(path, "w") as f:
        for i, r in enumerate(rows):
            f.write(json.dumps(r) + "\n")
            if i == blank_after:
                f.write("\n")


def read_jsonl(path):
    return [json.loads(line) for line in open(path)]


def assert_same_rows(got, want):
    """Same rows; STAR values equal up to float noise (padding differs with the batch a row was scored in)."""
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert {k: v for k, v in g.items() if k != "star_values"} == {k: v for k, v in w.items() if k != "star_values"}
        assert len(g["star_values"]) == len(w["star_values"])
        assert max(abs(a - b) for a, b in zip(g["star_values"], w["star_values"])) <= 1e-5


def expected_values(model, tok, row):
    if "messages" in row:
        return score_response(model, tok, row["messages"][:-1], row["messages"][-1]["content"], chunk_words=3)
    return score_response(model, tok, row["prompt"], row["response"], chunk_words=3)


def test_annotate_keeps_fields_and_adds_values(tmp_path):
    model, tok = star_common.guard("sdpa")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, ROWS, blank_after=1)
    report = annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=3, batch_size=2, progress=False)
    assert report["rows_scored"] == 5 and report["rows_skipped"] == 0 and report["guard_tokens"] > 0
    assert report["engine"] == "shared"
    got = read_jsonl(out)
    assert len(got) == 5
    for row, o in zip(ROWS, got):
        assert {k: v for k, v in o.items() if not k.startswith("star_")} == row
        assert o["star_chunk_words"] == 3
        want = expected_values(model, tok, row)
        assert len(o["star_values"]) == len(want)
        assert max(abs(a - b) for a, b in zip(o["star_values"], want)) <= 1e-4
    assert src.read_text().count("\n") == 6  # the input is untouched


def test_trl_prompt_completion_rows_are_scored_as_their_conversation(tmp_path):
    """TRL's {prompt, completion} rows, plain and conversational: the values of the equivalent prompt/response and
    messages rows; the output keeps the row as it was."""
    model, tok = star_common.guard("sdpa")
    ours = [r for r in ROWS if "prompt" in r][:2] + [r for r in ROWS if "messages" in r][:1]
    trl = [{"prompt": r["prompt"], "completion": r["response"]} if "prompt" in r else
           {"prompt": r["messages"][:-1], "completion": r["messages"][-1:]} for r in ours]
    for rows, name in ((ours, "ours"), (trl, "trl")):
        write_jsonl(tmp_path / f"{name}.jsonl", rows)
        annotate_file(model, tok, tmp_path / f"{name}.jsonl", tmp_path / f"{name}.out.jsonl", "llama-guard-3",
                      chunk_words=3, batch_size=2, progress=False)
    got, want = read_jsonl(tmp_path / "trl.out.jsonl"), read_jsonl(tmp_path / "ours.out.jsonl")
    assert [{k: v for k, v in g.items() if not k.startswith("star_")} for g in got] == trl
    for g, w in zip(got, want):
        assert max(abs(a - b) for a, b in zip(g["star_values"], w["star_values"])) <= 1e-5


@pytest.mark.parametrize("cut", [1, 25, -30, -2, -1])
def test_resume_skips_done_rows_and_repairs_a_torn_line(tmp_path, cut):
    model, tok = star_common.guard("sdpa")
    src, out, full = tmp_path / "in.jsonl", tmp_path / "out.jsonl", tmp_path / "full.jsonl"
    write_jsonl(src, ROWS)
    annotate_file(model, tok, src, full, "llama-guard-3", chunk_words=3, progress=False)
    lines = full.read_text().splitlines(keepends=True)
    out.write_text("".join(lines[:2]) + lines[2][:cut])  # two rows, then a crash in mid-write
    with pytest.warns(UserWarning, match="incomplete last line"):
        report = annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=3, progress=False)
    assert report["rows_skipped"] == 2 and report["rows_scored"] == 3
    assert_same_rows(read_jsonl(out), read_jsonl(full))
    report = annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=3, progress=False)
    assert report["rows_skipped"] == 5 and report["rows_scored"] == 0 and report["guard_tokens"] == 0
    # an output made with other settings or from other data is not resumed
    with pytest.raises(SafeshapeError, match="not a partial STAR annotation"):
        annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=4, progress=False)
    write_jsonl(tmp_path / "other.jsonl", ROWS[1:])
    with pytest.raises(SafeshapeError, match="not a partial STAR annotation"):
        annotate_file(model, tok, tmp_path / "other.jsonl", out, "llama-guard-3", chunk_words=3, progress=False)
    report = annotate_file(model, tok, tmp_path / "other.jsonl", out, "llama-guard-3", chunk_words=3,
                           progress=False, overwrite=True)
    assert report["rows_scored"] == 4
    assert_same_rows(read_jsonl(out), read_jsonl(full)[1:])


def _annotated(tmp_path, rows=ROWS):
    """The annotation of ``rows`` (cached per test) as bytes."""
    src, full = tmp_path / "in.jsonl", tmp_path / "full.jsonl"
    write_jsonl(src, rows)
    model, tok = star_common.guard("sdpa")
    annotate_file(model, tok, src, full, "llama-guard-3", chunk_words=3, progress=False)
    return full.read_bytes()


NOT_AN_ANNOTATION = {
    # a guard's model.safetensors given as --out: no newline at all, so everything would be a "torn last line"
    "safetensors": lambda full: b"\x18\x00\x00\x00\x00\x00\x00\x00" + b'{"w":{"dtype":"F32"}}   ' + bytes(range(256)),
    "text without newline": lambda full: b"my precious notes",
    "text with lines": lambda full: b"line one\nline two\npartial",
    "rows of another input": lambda full: b"".join(full.splitlines(keepends=True)[1:3]),
    "first row, then foreign bytes": lambda full: full.splitlines(keepends=True)[0] + b'{"id": 99, "pro',
    "first row, then another row torn": lambda full: full.splitlines(keepends=True)[0] +
    full.splitlines(keepends=True)[3][:40],
    "invalid UTF-8 in a row": lambda full: full.splitlines(keepends=True)[0].replace(b"bread", b"br\xffad"),
    "a blank line": lambda full: full.splitlines(keepends=True)[0] + b"\n",
    "values are not numbers": lambda full: full.splitlines(keepends=True)[0].replace(b'"star_values": [',
                                                                                     b'"star_values": ["x", '),
    "torn values with letters": lambda full: full.splitlines(keepends=True)[0] + full.splitlines(
        keepends=True)[1].split(b'"star_values": [')[0] + b'"star_values": [0.5, evil',
}


@pytest.mark.parametrize("case", sorted(NOT_AN_ANNOTATION))
def test_an_existing_out_that_is_not_a_partial_annotation_is_refused_untouched(tmp_path, case):
    model, tok = star_common.guard("sdpa")
    content = NOT_AN_ANNOTATION[case](_annotated(tmp_path))
    out = tmp_path / "out.bin"
    out.write_bytes(content)
    with pytest.raises(SafeshapeError, match="not a partial STAR annotation"):
        annotate_file(model, tok, tmp_path / "in.jsonl", out, "llama-guard-3", chunk_words=3, progress=False)
    assert out.read_bytes() == content  # not one byte cut


def test_an_out_that_is_a_folder_is_refused(tmp_path):
    model, tok = star_common.guard("sdpa")
    write_jsonl(tmp_path / "in.jsonl", ROWS)
    (tmp_path / "out").mkdir()
    with pytest.raises(SafeshapeError, match="not a regular file"):
        annotate_file(model, tok, tmp_path / "in.jsonl", tmp_path / "out", "llama-guard-3", progress=False)


def test_invalid_utf8_in_the_input_names_the_line_and_keeps_done_rows(tmp_path):
    model, tok = star_common.guard("sdpa")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps(r).encode() + b"\n" for r in ROWS]
    lines[3] = b'{"prompt": "caf\xe9", "response": "ok"}\n'  # Latin-1, not UTF-8
    src.write_bytes(b"".join(lines))
    with pytest.raises(SafeshapeError, match=r"in.jsonl:4: .*UTF-8"):
        annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=3, batch_size=2, progress=False)
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 2]
    # a rerun resumes after them and stops at the same line, keeping them
    with pytest.raises(SafeshapeError, match=r"in.jsonl:4: .*UTF-8"):
        annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=3, batch_size=2, progress=False)
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 2]


@pytest.mark.parametrize("bad, message", [
    ("{not json", "not valid JSON"),
    (json.dumps([1, 2]), "must be a JSON object"),
    (json.dumps({"prompt": "x"}), "needs 'prompt' and 'response', 'messages', or TRL's 'prompt' and 'completion'"),
    (json.dumps({"prompt": "x", "completion": ["y"]}), "TRL prompt-completion row: .* got str and list"),
    (json.dumps({"prompt": "x", "response": 3}), "must be strings"),
    (json.dumps({"prompt": "x", "response": "   "}), "no words"),
    (json.dumps({"messages": [{"role": "user", "content": "x"}, {"role": "user", "content": "y"}]}),
     "last message must be the assistant"),
])
def test_malformed_row_stops_with_its_line_number(tmp_path, bad, message):
    model, tok = star_common.guard("sdpa")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    lines = [json.dumps(r) for r in ROWS[:3]] + [bad] + [json.dumps(ROWS[3])]
    src.write_text("\n".join(lines) + "\n")
    with pytest.raises(SafeshapeError, match=f"in.jsonl:4: .*{message}"):
        annotate_file(model, tok, src, out, "llama-guard-3", chunk_words=3, batch_size=8, progress=False)
    assert [r["id"] for r in read_jsonl(out)] == [0, 1, 2]  # rows before it written whole, none for it


def test_output_may_not_be_the_input(tmp_path):
    model, tok = star_common.guard("sdpa")
    src = tmp_path / "in.jsonl"
    write_jsonl(src, ROWS[:1])
    with pytest.raises(SafeshapeError, match="is the input file"):
        annotate_file(model, tok, src, src, "llama-guard-3", progress=False)
    with pytest.raises(SafeshapeError, match="no such file"):
        annotate_file(model, tok, tmp_path / "nope.jsonl", tmp_path / "o.jsonl", "llama-guard-3", progress=False)


def run_cli(argv):
    parser = argparse.ArgumentParser()
    star_cli.add_arguments(parser)
    return star_cli.main(parser.parse_args(argv))


def test_cli(tmp_path, capsys):
    assert any(name == "star" and module == "safeshape.star.cli" for name, module, _ in cli.SUBCOMMANDS)
    tiny.save_tiny_guard(tmp_path / "guard")
    src, out = tmp_path / "in.jsonl", tmp_path / "out.jsonl"
    write_jsonl(src, ROWS)
    argv = ["--guard", str(tmp_path / "guard"), "--data", str(src), "--out", str(out), "--chunk-words", "3",
            "--batch-size", "2", "--no-progress", "--json", "--report", str(tmp_path / "report.json")]
    capsys.readouterr()  # what building the guard printed (deepspeed's import warning, when installed) is not ours
    assert run_cli(argv) == 0
    captured = capsys.readouterr()
    printed = captured.out.strip().splitlines()
    report = json.loads(printed[-1])
    assert len(printed) == 1 and report["rows_scored"] == 5  # --json: stdout is the JSON line alone
    assert "STAR: scored 5 rows" in captured.err
    assert run_cli(argv[:-3] + ["--out", str(tmp_path / "human.jsonl")]) == 0  # without --json: the summary line
    assert capsys.readouterr().out.startswith("STAR: scored 5 rows")
    assert json.loads((tmp_path / "report.json").read_text()) == report
    model, tok = star_common.guard("sdpa")  # same seed: same weights as the saved guard
    for row, o in zip(ROWS, read_jsonl(out)):
        want = expected_values(model, tok, row)
        assert max(abs(a - b) for a, b in zip(o["star_values"], want)) <= 1e-5
    # rerun: everything already done; the report file is not silently replaced
    assert run_cli(argv) == 2
    assert "exists" in capsys.readouterr().err
    assert run_cli(argv[:-2]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["rows_skipped"] == 5
    assert run_cli(argv[:-2] + ["--preset", "generic"]) == 2
    assert "generic" in capsys.readouterr().err
    assert run_cli(["--guard", str(tmp_path / "missing")] + argv[2:-2]) == 2
    assert "no such folder" in capsys.readouterr().err
    assert run_cli(argv[:-2] + ["--guard-date", "yesterday"]) == 2
    assert "--guard-date 'yesterday'" in capsys.readouterr().err
    assert report["responses_per_s"] > 0 and report["guard_tokens_per_s"] > 0
    assert report["rows_with_system"] == 0 and report["shared_fallbacks"] == 0
