"""Training data through every format (JSONL, JSON array, JSON lines, parquet, CSV, datasets.save_to_disk with
--split) gives the same examples; other files are clear errors; --train-on last|all for multi-turn rows."""
import json
import shutil

import pytest

from safeshape import cli, testing
from safeshape.data import IGNORE_INDEX, encode_row, load_examples
from safeshape.datafiles import read_rows
from safeshape.errors import SafeshapeError

datasets = pytest.importorskip("datasets")


@pytest.fixture(scope="module")
def tokenizer():
    return testing.build_tiny_tokenizer(vocab_size=320)


@pytest.fixture(scope="module")
def rows():
    dss = testing.tiny_rows(6, "dss", seed=2)
    return [{**r, "safe": i % 2 == 0} for i, r in enumerate(dss)]


def _write_all(root, rows) -> dict:
    root.mkdir(exist_ok=True)
    paths = {"jsonl": root / "d.jsonl", "json": root / "d.json", "json-lines": root / "lines.json",
             "parquet": root / "d.parquet", "csv": root / "d.csv", "disk": root / "disk", "disk-dict": root / "dd"}
    paths["jsonl"].write_text("".join(json.dumps(r) + "\n" for r in rows))
    paths["json"].write_text(json.dumps(rows, indent=1))
    paths["json-lines"].write_text(paths["jsonl"].read_text())
    table = datasets.Dataset.from_list(rows)
    table.to_parquet(str(paths["parquet"]))
    # a CSV cell holds text: structured columns as JSON
    datasets.Dataset.from_list([{**r, "star_values": json.dumps(r["star_values"])} for r in rows]).to_csv(
        str(paths["csv"]), index=False)
    table.save_to_disk(str(paths["disk"]))
    datasets.DatasetDict({"train": table, "test": table.select(range(2))}).save_to_disk(str(paths["disk-dict"]))
    return paths


@pytest.mark.parametrize("loss", ["dss", "rs", "sft"])
def test_every_format_gives_the_same_examples(tmp_path, tokenizer, rows, loss):
    paths = _write_all(tmp_path / "data", rows)
    want, _ = load_examples(paths["jsonl"], tokenizer, loss, 256)
    for name, path in paths.items():
        split = "train" if name == "disk-dict" else None
        got, _ = load_examples(path, tokenizer, loss, 256, split=split)
        assert [(e.input_ids, e.labels, e.weights) for e in got] == [(e.input_ids, e.labels, e.weights)
                                                                      for e in want], name
    test_split, _ = load_examples(paths["disk-dict"], tokenizer, loss, 256, split="test")
    assert len(test_split) == 2


def test_messages_rows_in_parquet(tmp_path, tokenizer):
    msgs = testing.tiny_rows(3, "sft", seed=4, messages=True)
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(r) + "\n" for r in msgs))
    datasets.Dataset.from_list(msgs).to_parquet(str(tmp_path / "m.parquet"))
    a, _ = load_examples(tmp_path / "m.jsonl", tokenizer, "sft", 256)
    b, _ = load_examples(tmp_path / "m.parquet", tokenizer, "sft", 256)
    assert [e.labels for e in a] == [e.labels for e in b]


def test_trl_prompt_completion_rows(tmp_path, tokenizer):
    """TRL's {prompt, completion} rows (strings, and the conversational form with message lists) give the examples
    of the equivalent prompt/response and messages rows, STAR values and safe flags included."""
    plain = testing.tiny_rows(4, "dss", seed=5)
    msgs = testing.tiny_rows(3, "dss", seed=6, messages=True)
    trl = [{"prompt": r["prompt"], "completion": r.pop("response"), **{k: v for k, v in r.items() if k != "prompt"}}
           for r in [dict(r) for r in plain]]
    trl += [{"prompt": r["messages"][:-1], "completion": r["messages"][-1:],
             **{k: v for k, v in r.items() if k != "messages"}} for r in msgs]
    (tmp_path / "ours.jsonl").write_text("".join(json.dumps(r) + "\n" for r in plain + msgs))
    (tmp_path / "trl.jsonl").write_text("".join(json.dumps(r) + "\n" for r in trl))
    datasets.Dataset.from_list(trl[4:]).to_parquet(str(tmp_path / "conv.parquet"))
    for loss in ("sft", "dss"):
        want, _ = load_examples(tmp_path / "ours.jsonl", tokenizer, loss, 256)
        got, _ = load_examples(tmp_path / "trl.jsonl", tokenizer, loss, 256)
        assert [(e.input_ids, e.labels, e.weights) for e in got] == [(e.input_ids, e.labels, e.weights) for e in want]
        conv, _ = load_examples(tmp_path / "conv.parquet", tokenizer, loss, 256)
        assert [e.labels for e in conv] == [e.labels for e in want[4:]]
    with pytest.raises(SafeshapeError, match=r"row 9: TRL prompt-completion row: .* got str and list"):
        encode_row(tokenizer, {"prompt": "x", "completion": [{"role": "assistant", "content": "y"}]}, "sft", 256,
                   "row 9")


def test_errors_name_the_row(tmp_path, tokenizer):
    bad = [{"prompt": "p", "response": "r"}, {"prompt": "p"}]
    datasets.Dataset.from_list(bad).to_parquet(str(tmp_path / "x.parquet"))
    with pytest.raises(SafeshapeError, match=r"x\.parquet row 2: a row needs `prompt` and `response`"):
        load_examples(tmp_path / "x.parquet", tokenizer, "sft", 256)
    (tmp_path / "a.json").write_text('[{"prompt": "p", "response": "r"}, 3]')
    with pytest.raises(SafeshapeError, match=r"a\.json row 2: a row must be a JSON object"):
        read_rows(tmp_path / "a.json")


def test_other_files_are_clear_errors(tmp_path, rows):
    paths = _write_all(tmp_path / "data", rows)
    disguised = tmp_path / "rows.jsonl"
    disguised.write_bytes(paths["parquet"].read_bytes())
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\u00e9", "response": "r"}\n'.encode("latin-1"))
    text = tmp_path / "rows.txt"
    text.write_text("{}")
    not_dataset = tmp_path / "folder"
    not_dataset.mkdir()
    cases = [(disguised, None, "looks like a parquet file"), (latin, None, "line 1: not valid UTF-8"),
             (text, None, "unknown data format .txt"), (not_dataset, None, "not one written by datasets"),
             (paths["disk-dict"], None, "pass --split, one of the dataset's splits: test, train"),
             (paths["disk-dict"], "valid", "--split 'valid' is not the dataset's splits: test, train"),
             (paths["disk"], "train", "holds one Dataset, not a DatasetDict"),
             (paths["jsonl"], "train", "--split picks a split of a datasets.save_to_disk folder")]
    for path, split, message in cases:
        with pytest.raises(SafeshapeError, match=message.replace(".", r"\.")):
            read_rows(path, split)


_CONVERSATION = {"messages": [
    {"role": "system", "content": "Be kind."}, {"role": "user", "content": "Hi there."},
    {"role": "assistant", "content": "Hello friend."}, {"role": "user", "content": "Bye."},
    {"role": "assistant", "content": "See you again."}]}


def _labelled(tokenizer, ex) -> str:
    return tokenizer.decode([t for t in ex.labels if t != IGNORE_INDEX])


def test_train_on_all_assistant_turns(tokenizer):
    last = encode_row(tokenizer, _CONVERSATION, "sft", 512, "row", train_on="last")
    every = encode_row(tokenizer, _CONVERSATION, "sft", 512, "row", train_on="all")
    assert _labelled(tokenizer, last) == "See you again.<|end|>\n"
    assert _labelled(tokenizer, every) == "Hello friend.<|end|>\nSee you again.<|end|>\n"
    assert every.input_ids == last.input_ids
    rs = encode_row(tokenizer, {**_CONVERSATION, "safe": False}, "rs", 512, "row", train_on="all")
    assert rs.labels == every.labels and set(rs.weights) == {0.0}
    with pytest.raises(SafeshapeError, match="STAR values cover the last response only"):
        encode_row(tokenizer, _CONVERSATION, "dss", 512, "row", train_on="all")


def test_train_cli_reads_a_dataset_folder_split(tmp_path, rows, capsys):
    paths = _write_all(tmp_path / "data", rows)
    model = testing.save_tiny_model(tmp_path / "model", hidden_size=32, vocab_size=320)
    out = tmp_path / "o"
    argv = ["train", "--model", str(model), "--data", str(paths["disk-dict"]), "--split", "train", "--eval-data",
            str(paths["disk-dict"]), "--eval-split", "test", "--out", str(out), "--loss", "rs", "--max-steps", "2",
            "--save-every", "1", "--batch-size", "2", "--lora-r", "2", "--max-len", "96", "--no-progress",
            "--device", "cpu", "--train-on", "all", "--json"]
    assert cli.main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    # rs drops the rows with safe=false (as the authors run it)
    assert summary["rejected_rows"] == sum(not r["safe"] for r in rows)
    assert summary["examples"] + summary["rejected_rows"] == len(rows) and summary["eval_loss"] is not None
    # --resume fingerprints the folder: same data resumes, changed data is refused
    assert cli.main(argv + ["--resume"]) == 0
    shutil.rmtree(paths["disk-dict"])
    smaller = datasets.Dataset.from_list(rows[:4])
    datasets.DatasetDict({"train": smaller, "test": smaller.select(range(2))}).save_to_disk(str(paths["disk-dict"]))
    capsys.readouterr()
    assert cli.main(argv + ["--resume"]) == 2
    assert "changed since that checkpoint" in capsys.readouterr().err
