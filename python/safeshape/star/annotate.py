"""Annotating a JSONL dataset with STAR values: resumable, rows appended whole, bad rows named by line number.

Input rows are ``{"prompt": ..., "response": ...}`` or ``{"messages": [...]}`` (the last message is the assistant
response, the ones before it the conversation). Output rows keep every input field and add ``star_values`` (one
P(safe) per chunk, in order) and ``star_chunk_words`` (the M used).
"""
from __future__ import annotations

import json
import os
import time
import warnings
from pathlib import Path

from ..errors import SafeshapeError
from .presets import GuardPreset
from .scoring import StarScorer

STAR_FIELDS = ("star_values", "star_chunk_words")


def row_conversation(row, where: str) -> tuple[list[dict], str]:
    """(conversation before the response, response) of a dataset row; SafeshapeError naming ``where`` if malformed."""
    if not isinstance(row, dict):
        raise SafeshapeError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    if "messages" in row:
        msgs = row["messages"]
        if not isinstance(msgs, list) or len(msgs) < 2:
            raise SafeshapeError(f"{where}: 'messages' must be a list of at least two messages (the conversation, "
                                 "then the assistant response)")
        for i, m in enumerate(msgs):
            if not isinstance(m, dict) or not isinstance(m.get("role"), str) or not isinstance(m.get("content"), str):
                raise SafeshapeError(f"{where}: messages[{i}] must be an object with string 'role' and 'content'")
        if msgs[-1]["role"] != "assistant":
            raise SafeshapeError(f"{where}: the last message must be the assistant response, got role "
                                 f"{msgs[-1]['role']!r}")
        context, response = [dict(role=m["role"], content=m["content"]) for m in msgs[:-1]], msgs[-1]["content"]
    elif "prompt" in row and "response" in row:
        if not isinstance(row["prompt"], str) or not isinstance(row["response"], str):
            raise SafeshapeError(f"{where}: 'prompt' and 'response' must be strings")
        context, response = [{"role": "user", "content": row["prompt"]}], row["response"]
    else:
        raise SafeshapeError(f"{where}: a row needs 'prompt' and 'response', or 'messages'; it has keys "
                             f"{sorted(row)}")
    if not response.split():
        raise SafeshapeError(f"{where}: the response has no words, so there is nothing to score")
    return context, response


def _strip_star(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in STAR_FIELDS}


def _done_rows(out_path: Path) -> list[dict]:
    """The complete rows already in OUT. A torn last line (a crash in mid-write) is cut off first."""
    data = out_path.read_bytes()
    if data and not data.endswith(b"\n"):
        keep = data.rfind(b"\n") + 1
        warnings.warn(f"{out_path}: removing an incomplete last line ({len(data) - keep} bytes) left by an "
                      "interrupted run", stacklevel=3)
        with open(out_path, "r+b") as f:
            f.truncate(keep)
        data = data[:keep]
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), 1):
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise SafeshapeError(f"{out_path}:{n}: not valid JSON ({exc}); this is not a partial STAR annotation: "
                                 "choose another output or overwrite it") from exc
    return rows


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def annotate_file(guard, tokenizer, in_path, out_path, preset: str | GuardPreset, chunk_words: int = 5,
                  engine: str = "shared", batch_size: int = 8, temperature: float = 1.0, progress: bool = True,
                  overwrite: bool = False) -> dict:
    """Add ``star_values`` and ``star_chunk_words`` to every row of the JSONL file ``in_path``, into ``out_path``.

    Resumable: rows already in ``out_path`` (which must be the first rows of ``in_path``, annotated with the same
    ``chunk_words``) are skipped, and new rows are appended, each in one write, ``batch_size`` rows at a time and
    synced to disk; a torn last line from a crash is removed on the next run. ``overwrite=True`` starts afresh.
    A malformed row stops the run with its line number, after the rows before it are written; nothing is written
    for it. Blank lines are skipped. Returns counts: ``rows_scored``, ``rows_skipped`` (already done),
    ``guard_tokens`` (guard tokens processed in this run), with the engine used, seconds and more statistics.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    if not in_path.is_file():
        raise SafeshapeError(f"input {in_path}: no such file")
    if out_path.resolve() == in_path.resolve() or (out_path.exists() and os.path.samefile(out_path, in_path)):
        raise SafeshapeError(f"output {out_path} is the input file: choose another output path")
    if not out_path.parent.is_dir():
        raise SafeshapeError(f"output {out_path}: folder {out_path.parent} does not exist")
    scorer = StarScorer(guard, tokenizer, preset=preset, chunk_words=chunk_words, engine=engine,
                        batch_size=batch_size, temperature=temperature)
    if out_path.exists() and overwrite:
        out_path.write_bytes(b"")
    done = _done_rows(out_path) if out_path.exists() else []
    total = _count_rows(in_path)
    if len(done) > total:
        raise SafeshapeError(f"output {out_path} has {len(done)} rows but input {in_path} has only {total}: it is "
                             "not a partial annotation of this input (overwrite it or choose another output)")

    from tqdm.auto import tqdm

    start = time.perf_counter()
    counts = {"rows_scored": 0, "rows_skipped": 0}
    bar = tqdm(total=total, initial=len(done), unit="row", desc="STAR", disable=not progress, dynamic_ncols=True)
    with open(in_path, "r", encoding="utf-8") as fin, open(out_path, "ab") as fout:
        pending: list[tuple[dict, object]] = []

        def flush():
            if not pending:
                return
            values = scorer.score_inputs([gi for _, gi in pending])
            for (row, _), v in zip(pending, values):
                line = json.dumps({**row, "star_values": v, "star_chunk_words": scorer.chunk_words},
                                  ensure_ascii=False) + "\n"
                fout.write(line.encode("utf-8"))  # one write per row
            fout.flush()
            os.fsync(fout.fileno())
            counts["rows_scored"] += len(pending)
            bar.update(len(pending))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(guard_tok_s=f"{scorer.stats['guard_tokens'] / elapsed:.0f}")
            pending.clear()

        index = 0
        try:
            for lineno, line in enumerate(fin, 1):
                if not line.strip():
                    continue
                where = f"{in_path}:{lineno}"
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    flush()
                    raise SafeshapeError(f"{where}: not valid JSON ({exc.msg} at column {exc.colno})") from exc
                if index < len(done):
                    if not isinstance(row, dict) or _strip_star(done[index]) != _strip_star(row) or \
                            done[index].get("star_chunk_words") != scorer.chunk_words:
                        raise SafeshapeError(
                            f"{out_path}:{index + 1} does not match {where} annotated with chunk_words="
                            f"{scorer.chunk_words}: the output is not a partial annotation of this input with these "
                            "settings (overwrite it or choose another output)")
                    index += 1
                    counts["rows_skipped"] += 1
                    continue
                try:
                    context, response = row_conversation(row, where)
                    gi = scorer.build(context, response)
                except SafeshapeError as exc:
                    flush()
                    raise SafeshapeError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from exc
                pending.append((row, gi))
                index += 1
                if len(pending) >= scorer.batch_size:
                    flush()
            flush()
        finally:
            bar.close()
    stats = scorer.stats
    return {**counts, "guard_tokens": stats["guard_tokens"], "guard_slots": stats["guard_slots"],
            "forward_passes": stats["forward_passes"], "chunks": stats["chunks"],
            "tokenization_mismatches": stats["tokenization_mismatches"], "engine": scorer.engine,
            "chunk_words": scorer.chunk_words, "temperature": scorer.temperature,
            "preset": scorer.template.preset.name, "input": str(in_path), "output": str(out_path),
            "seconds": time.perf_counter() - start}
