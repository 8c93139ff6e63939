"""Annotating a JSONL dataset with STAR values: resumable, rows appended whole, bad rows named by line number.

Input rows are ``{"prompt": ..., "response": ...}``, ``{"messages": [...]}`` (the last message is the assistant
response, the ones before it the conversation) or TRL's ``{"prompt", "completion"}`` (strings or message lists). Output rows keep every input field and add ``star_values`` (one
P(safe) per chunk, in order) and ``star_chunk_words`` (the M used).
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import time
from pathlib import Path
from typing import Iterator

from ..chunks import chunk_char_spans
from ..data import trl_row
from ..datafiles import iter_jsonl
from ..errors import SafeshapeError
from ..io import atomic_write_bytes, cut_torn_tail, refuse_link, split_torn_tail
from .presets import GuardPreset
from .scoring import StarScorer

STAR_FIELDS = ("star_values", "star_chunk_words", "star_recipe")


def row_conversation(row, where: str) -> tuple[list[dict], str]:
    """(conversation before the response, response) of a dataset row; SafeshapeError naming ``where`` if malformed."""
    if not isinstance(row, dict):
        raise SafeshapeError(f"{where}: a row must be a JSON object, got {type(row).__name__}")
    row = trl_row(row, where)  # TRL's prompt/completion rows (the output keeps them as they were)
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
        raise SafeshapeError(f"{where}: a row needs 'prompt' and 'response', 'messages', or TRL's 'prompt' and "
                             f"'completion'; it has keys {sorted(row)}")
    if not response.split():
        raise SafeshapeError(f"{where}: the response has no words, so there is nothing to score")
    return context, response


def _strip_star(row: dict) -> dict:
    return {k: v for k, v in row.items() if k not in STAR_FIELDS}


def jsonl_rows(path: Path) -> Iterator[tuple[str, object]]:
    """``(where, row)`` for the non-blank lines of a JSONL file, ``where`` = ``path:line``. A line that is not UTF-8
    or not JSON raises SafeshapeError naming it, when it is reached (so the rows before it can be handled first)."""
    for lineno, row in iter_jsonl(path, where=lambda i: f"{path}:{i}"):
        yield f"{path}:{lineno}", row


def shard_rows(rows: Iterator[tuple[str, object]], shard: tuple[int, int]) -> Iterator[tuple[str, object]]:
    """The rows of shard ``(rank, world)``: rows ``rank, rank + world, ...`` (counting non-blank lines from 0)."""
    rank, world = shard
    for i, item in enumerate(rows):
        if i % world == rank:
            yield item


def _annotated_line(row: dict, values, chunk_words: int, recipe: str = "exact") -> str:
    """A row's annotated copy; ``star_recipe`` is written only for the authors' recipe (the trainer then maps values
    to tokens with their boundaries)."""
    extra = {"star_recipe": recipe} if recipe != "exact" else {}
    return json.dumps({**row, "star_values": values, "star_chunk_words": chunk_words, **extra},
                      ensure_ascii=False) + "\n"


_MARK = "\u0000STAR-VALUES\u0000"
_TORN_VALUES = re.compile(r"\[[-+0-9.eE, NaIfinty]*(\].*)?", re.S)


def _is_torn_annotation(torn: bytes, row: dict, chunk_words: int, recipe: str) -> bool:
    """Whether ``torn`` (a last line without its newline) can be the start of the annotated copy of ``row``."""
    for cut in range(4):  # the write may have stopped inside a multi-byte character
        try:
            text = torn[:len(torn) - cut].decode("utf-8")
            break
        except UnicodeDecodeError:
            continue
    else:
        return False
    before, after = _annotated_line(row, _MARK, chunk_words, recipe)[:-1].split(json.dumps(_MARK))
    if len(text) <= len(before):
        return before.startswith(text)
    if not text.startswith(before):
        return False
    m = _TORN_VALUES.fullmatch(text[len(before):])
    return m is not None and (m.group(1) is None or after.startswith(m.group(1)[1:]))


def _resumable_rows(out_path: Path, in_path: Path, chunk_words: int, recipe: str, shard=(0, 1)) -> int:
    """How many rows of an existing OUT to keep. OUT is validated before anything is changed: every complete line
    must be the annotated copy (same fields, chunk_words, one value per chunk) of the next input row, and a torn
    last line (a crash in mid-write) the start of one; only then is the torn line cut off. Anything else is
    refused (SafeshapeError), the file untouched."""
    if not out_path.exists():
        return 0
    if not out_path.is_file():
        raise SafeshapeError(f"output {out_path} exists and is not a regular file; choose another output")
    data = out_path.read_bytes()
    lines, torn = split_torn_tail(data)

    def refuse(why: str):
        raise SafeshapeError(f"output {out_path} exists and is not a partial STAR annotation of {in_path} with "
                             f"chunk_words={chunk_words} ({why}); it was left untouched: choose another output, or "
                             "pass --overwrite (overwrite=True) to replace it")

    with contextlib.closing(shard_rows(jsonl_rows(in_path), shard)) as inputs:

        def next_input(n: int):
            try:
                return next(inputs)
            except StopIteration:
                refuse(f"its line {n} has no input row to match: the input has fewer rows")
            except SafeshapeError as exc:
                refuse(f"its line {n} would be the annotation of a bad input row: {exc}")

        for n, raw in enumerate(lines, 1):
            try:
                row = json.loads(raw.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError):
                refuse(f"its line {n} is not a UTF-8 JSON row")
            if not isinstance(row, dict) or row.get("star_chunk_words") != chunk_words or \
                    row.get("star_recipe", "exact") != recipe or not isinstance(row.get("star_values"), list):
                refuse(f"its line {n} is not a row annotated with chunk_words={chunk_words} and the {recipe} "
                       "recipe")
            where, source = next_input(n)
            if not isinstance(source, dict) or _strip_star(row) != _strip_star(source):
                refuse(f"its line {n} is not the annotated copy of {where}")
            try:
                chunks = len(chunk_char_spans(row_conversation(source, where)[1], chunk_words))
            except SafeshapeError as exc:
                refuse(f"its line {n} would be the annotation of a bad input row: {exc}")
            values = row["star_values"]
            if len(values) != chunks or not all(isinstance(v, (int, float)) and not isinstance(v, bool)
                                                for v in values):
                refuse(f"its line {n} does not hold {chunks} numeric STAR values")
        if not torn:
            return len(lines)
        where, source = next_input(len(lines) + 1)
    if not isinstance(source, dict) or not _is_torn_annotation(torn, source, chunk_words, recipe):
        refuse(f"its last line (no newline) is not the start of the annotated copy of {where}")
    cut_torn_tail(out_path, data)
    return len(lines)


def _count_rows(path: Path) -> int:
    with open(path, "rb") as f:
        return sum(1 for line in f if line.strip())


def annotate_file(guard, tokenizer, in_path, out_path, preset: str | GuardPreset, chunk_words: int = 5,
                  engine: str = "shared", batch_size: int = 8, temperature: float = 1.0, progress: bool = True,
                  overwrite: bool = False, guard_date=None, recipe: str = "exact", shard: tuple[int, int] = (0, 1)
                  ) -> dict:
    """Add ``star_values`` and ``star_chunk_words`` to every row of the JSONL file ``in_path``, into ``out_path``.

    Resumable: rows already in ``out_path`` (which must be the first rows of ``in_path``, annotated with the same
    ``chunk_words``; anything else is refused untouched) are skipped, and new rows are appended, each in one write,
    ``batch_size`` rows at a time and synced to disk; a torn last line from a crash is removed on the next run.
    ``overwrite=True`` starts afresh. A malformed row (bad UTF-8, bad JSON, bad fields) stops the run with its line
    number, after the rows before it are written; nothing is written for it. Blank lines are skipped.
    ``guard_date`` pins the date a guard template prints (default today; reported). ``recipe="authors"`` scores
    with the STAR authors' recipe (docs/math.md#star-authors-recipe) and marks the rows ``star_recipe``. ``shard=(rank, world)``
    annotates only rows ``rank, rank + world, ...`` (one process of a multi-process run). Returns counts:
    ``rows_scored``, ``rows_skipped`` (already done), ``rows_with_system`` (system messages not shown to the
    guard), ``shared_fallbacks``, ``guard_tokens`` (guard tokens processed in this run), with the engine used,
    seconds and more statistics.
    """
    in_path, out_path = Path(in_path), Path(out_path)
    refuse_link(out_path, "output")  # appended to in place: a link (dangling too) would be written through
    if not in_path.is_file():
        raise SafeshapeError(f"input {in_path}: no such file")
    if out_path.resolve() == in_path.resolve() or (out_path.exists() and os.path.samefile(out_path, in_path)):
        raise SafeshapeError(f"output {out_path} is the input file: choose another output path")
    if not out_path.parent.is_dir():
        raise SafeshapeError(f"output {out_path}: folder {out_path.parent} does not exist")
    if out_path.exists() and not out_path.is_file():
        raise SafeshapeError(f"output {out_path} exists and is not a regular file; choose another output")
    scorer = StarScorer(guard, tokenizer, preset=preset, chunk_words=chunk_words, engine=engine,
                        batch_size=batch_size, temperature=temperature, guard_date=guard_date, recipe=recipe)
    if out_path.exists() and overwrite:
        out_path.write_bytes(b"")
    rank, world = shard
    if not (isinstance(rank, int) and isinstance(world, int) and 0 <= rank < world):
        raise SafeshapeError(f"shard must be (rank, world) with 0 <= rank < world, got {shard!r}")
    done = _resumable_rows(out_path, in_path, scorer.chunk_words, scorer.recipe, shard)
    total = len(range(rank, _count_rows(in_path), world))

    from tqdm.auto import tqdm

    start = time.perf_counter()
    counts = {"rows_scored": 0, "rows_skipped": 0}
    bar = tqdm(total=total, initial=done, unit="row", desc="STAR", disable=not progress, dynamic_ncols=True)
    with open(out_path, "ab") as fout:
        pending: list[tuple[dict, object]] = []

        def flush():
            if not pending:
                return
            values = scorer.score_inputs([gi for _, gi in pending])
            for (row, _), v in zip(pending, values):
                fout.write(_annotated_line(row, v, scorer.chunk_words, scorer.recipe).encode("utf-8"))  # one write
            fout.flush()
            os.fsync(fout.fileno())
            counts["rows_scored"] += len(pending)
            bar.update(len(pending))
            elapsed = max(time.perf_counter() - start, 1e-9)
            bar.set_postfix(guard_tok_s=f"{scorer.stats['guard_tokens'] / elapsed:.0f}")
            pending.clear()

        rows = shard_rows(jsonl_rows(in_path), shard)
        try:
            while True:
                try:
                    item = next(rows, None)
                except SafeshapeError:
                    flush()  # the rows before a bad line are kept
                    raise
                if item is None:
                    break
                where, row = item
                if counts["rows_skipped"] < done:  # validated by _resumable_rows
                    counts["rows_skipped"] += 1
                    continue
                try:
                    context, response = row_conversation(row, where)
                    gi = scorer.build(context, response)
                except SafeshapeError as exc:
                    flush()
                    raise SafeshapeError(str(exc) if str(exc).startswith(where) else f"{where}: {exc}") from exc
                pending.append((row, gi))
                if len(pending) >= scorer.batch_size:
                    flush()
            flush()
        finally:
            rows.close()
            bar.close()
    stats = scorer.stats
    guard_date = scorer.template.guard_date
    return {**counts, "rows_with_system": stats["system_dropped"], "shared_fallbacks": stats["shared_fallbacks"],
            "guard_tokens": stats["guard_tokens"], "guard_slots": stats["guard_slots"],
            "forward_passes": stats["forward_passes"], "chunks": stats["chunks"], "engine": scorer.engine,
            "recipe": scorer.recipe, "verdicts_both_masked": stats["both_masked"],
            "chunk_words": scorer.chunk_words, "temperature": scorer.temperature,
            "preset": scorer.template.preset.name, "guard_date": guard_date.isoformat() if guard_date else None,
            "input": str(in_path), "output": str(out_path), "seconds": time.perf_counter() - start}


def merge_shards(in_path, parts: list[Path], out_path: Path, overwrite: bool = False) -> int:
    """Interleave the parts of a sharded run (part r holds rows r, r + N, ...) into ``out_path`` in input order,
    atomically; every part must be complete. Returns the number of rows."""
    total = _count_rows(Path(in_path))
    world = len(parts)
    expected = [len(range(r, total, world)) for r in range(world)]
    handles = []
    try:
        for p, n in zip(parts, expected):
            with open(p, "rb") as f:
                have = sum(1 for _ in f)
            if have != n:
                raise SafeshapeError(f"part {p} has {have} rows, expected {n}: the run did not finish")
            handles.append(open(p, "rb"))

        def lines():
            for i in range(total):
                yield handles[i % world].readline()

        atomic_write_bytes(out_path, lines(), overwrite=overwrite, inputs=[("--data", in_path)])
    finally:
        for h in handles:
            h.close()
    return total
