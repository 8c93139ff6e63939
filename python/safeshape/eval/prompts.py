"""Prompt files for ``safeshape eval``: harmful prompts (AdvBench, HEx-PHI, any CSV/JSONL with a prompt column) and
utility tasks (JSONL ``{prompt, answer}``). Every error names the file and line at fault."""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

from ..errors import SafeshapeError

# Column names tried, in order, when none is given: ours, then AdvBench's harmful_behaviors.csv (goal,target).
PROMPT_COLUMNS = ("prompt", "goal")
UTILITY_METRICS = ("exact", "contains")
DTYPES = ("float32", "bfloat16", "float16")  # --dtype of the policy and the guard (no torch import for --help)


@dataclass(frozen=True)
class Prompt:
    text: str
    category: str | None = None
    source: str = ""  # "file:line", for messages


@dataclass(frozen=True)
class UtilityItem:
    prompt: str
    answer: str
    metric: str = "exact"
    source: str = ""


def _pick_column(header: list[str], column: str | None, where: str) -> str:
    if column is not None:
        if column not in header:
            raise SafeshapeError(f"{where}: no column {column!r} (header: {', '.join(header)})")
        return column
    for c in PROMPT_COLUMNS:
        if c in header:
            return c
    raise SafeshapeError(f"{where}: no prompt column: expected one of {', '.join(PROMPT_COLUMNS)} (header: "
                         f"{', '.join(header)}); name another with --prompt-column")


def _text(value, where: str, what: str = "prompt") -> str:
    if not isinstance(value, str) or not value.strip():
        raise SafeshapeError(f"{where}: the {what} must be a non-empty string, got {value!r}")
    return value


def _read_csv(path: Path, column: str | None, category: str | None, headerless_ok: bool) -> list[Prompt]:
    try:
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
    except UnicodeDecodeError as exc:
        raise SafeshapeError(f"{path}: not UTF-8 text ({exc})") from None
    except csv.Error as exc:
        raise SafeshapeError(f"{path}: not a valid CSV file ({exc})") from None
    numbered = [(n, r) for n, r in enumerate(rows, 1) if any(c.strip() for c in r)]
    if not numbered:
        return []
    header = [c.strip() for c in numbered[0][1]]
    known = column in header if column else any(c in header for c in PROMPT_COLUMNS)
    if not known and headerless_ok and column is None:
        # HEx-PHI: one prompt per line, no header; the file is the category
        return [Prompt(r[0], category, f"{path}:{n}") for n, r in numbered if r and r[0].strip()]
    col = _pick_column(header, column, f"{path}:{numbered[0][0]}")
    idx = header.index(col)
    cat_idx = header.index("category") if "category" in header else None
    out = []
    for n, r in numbered[1:]:
        where = f"{path}:{n}"
        if len(r) <= idx:
            raise SafeshapeError(f"{where}: the row has {len(r)} fields, so no {col!r} (field {idx + 1})")
        cat = r[cat_idx].strip() if cat_idx is not None and len(r) > cat_idx and r[cat_idx].strip() else category
        out.append(Prompt(_text(r[idx], where), cat, where))
    return out


def _read_jsonl(path: Path, column: str | None, category: str | None) -> list[Prompt]:
    out = []
    for n, row in _jsonl_rows(path):
        where = f"{path}:{n}"
        col = _pick_column(list(row), column, where)
        cat = row.get("category", category)
        if cat is not None and not isinstance(cat, str):
            raise SafeshapeError(f"{where}: 'category' must be a string, got {cat!r}")
        out.append(Prompt(_text(row[col], where), cat, where))
    return out


def _jsonl_rows(path: Path):
    from ..datafiles import read_jsonl

    try:
        return read_jsonl(path)
    except UnicodeDecodeError as exc:
        raise SafeshapeError(f"{path}: not UTF-8 text ({exc})") from None


def _read_file(path: Path, column: str | None, category: str | None, in_folder: bool) -> list[Prompt]:
    suffix = path.suffix.lower()
    if suffix == ".csv":
        return _read_csv(path, column, category, headerless_ok=in_folder)
    if suffix in (".jsonl", ".json"):
        return _read_jsonl(path, column, category)
    raise SafeshapeError(f"{path}: unsupported prompt file type {suffix or '(none)'!r}: use .csv or .jsonl")


def load_prompts(path, column: str | None = None, limit: int | None = None, seed: int = 0) -> list[Prompt]:
    """Harmful prompts from a file or a folder.

    - a CSV with a header: the ``column`` column (default: ``prompt``, else AdvBench's ``goal``), and the
      ``category`` column if there is one;
    - a JSONL file: the same keys in each row;
    - a folder (HEx-PHI): every ``*.csv`` / ``*.jsonl`` in it, in name order, each file one category (its name
      without the extension, unless rows carry their own); a CSV there may have no header (one prompt a line).

    ``limit`` keeps a random subset of that many prompts (drawn with ``seed``), in file order.
    """
    p = Path(path)
    if p.is_dir():
        files = sorted(f for f in p.iterdir() if f.is_file() and f.suffix.lower() in (".csv", ".jsonl"))
        if not files:
            raise SafeshapeError(f"prompt folder {p}: no .csv or .jsonl files in it")
        prompts = [q for f in files for q in _read_file(f, column, f.stem, in_folder=True)]
    elif p.is_file():
        prompts = _read_file(p, column, None, in_folder=False)
    else:
        raise SafeshapeError(f"prompt file {p}: no such file or folder")
    if not prompts:
        raise SafeshapeError(f"prompt file {p}: no prompts in it (empty file?)")
    return subset(prompts, limit, seed)


def subset(items: list, limit: int | None, seed: int) -> list:
    """``limit`` items drawn at random with ``seed``, kept in their original order (all of them when None)."""
    if limit is None or limit >= len(items):
        return list(items)
    if limit < 1:
        raise SafeshapeError(f"--limit must be a positive integer, got {limit}")
    keep = sorted(random.Random(seed).sample(range(len(items)), limit))
    return [items[i] for i in keep]


def load_utility(path, metric: str = "exact", limit: int | None = None, seed: int = 0) -> list[UtilityItem]:
    """Utility task rows from JSONL ``{prompt, answer[, metric]}``; ``metric`` (``exact`` or ``contains``) is the
    default for rows without their own."""
    if metric not in UTILITY_METRICS:
        raise SafeshapeError(f"utility metric must be one of {', '.join(UTILITY_METRICS)}, got {metric!r}")
    p = Path(path)
    if not p.is_file():
        raise SafeshapeError(f"utility file {p}: no such file")
    items = []
    for n, row in _jsonl_rows(p):
        where = f"{p}:{n}"
        for key in ("prompt", "answer"):
            if key not in row:
                raise SafeshapeError(f"{where}: no {key!r} key (utility rows are {{prompt, answer}})")
        m = row.get("metric", metric)
        if m not in UTILITY_METRICS:
            raise SafeshapeError(f"{where}: 'metric' must be one of {', '.join(UTILITY_METRICS)}, got {m!r}")
        items.append(UtilityItem(_text(row["prompt"], where), _text(row["answer"], where, "answer"), m, where))
    if not items:
        raise SafeshapeError(f"utility file {p}: no rows in it (empty file?)")
    return subset(items, limit, seed)
