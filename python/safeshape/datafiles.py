"""Training rows from a file or a folder: JSONL (``.jsonl``), JSON (``.json``: an array of objects, or JSON lines),
parquet (``.parquet``), CSV (``.csv``) or a ``datasets.save_to_disk`` folder (``split`` picks one split of a
DatasetDict). JSONL and JSON are read here (errors name the line); parquet, CSV and folders go through the
``datasets`` library, an optional extra (``pip install 'safeshape[data]'``). Anything else is a clear error.
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Iterator

from .errors import SafeshapeError

FORMATS = "JSONL (.jsonl), JSON (.json), parquet (.parquet), CSV (.csv) or a datasets.save_to_disk folder"
# columns that hold structured values: a CSV cell carries them as JSON text
JSON_COLUMNS = ("messages", "star_values")
_MAGIC = {b"PAR1": "parquet", b"PK\x03\x04": "zip", b"\x1f\x8b": "gzip", b"ARROW1": "arrow"}


def iter_jsonl(path: str | os.PathLike, where=None) -> Iterator[tuple[int, object]]:
    """``(line_number, value)`` for the non-blank lines of a JSONL file, read lazily: a line that is not UTF-8 or
    not JSON raises SafeshapeError naming it (``where(line_number)``, default ``"PATH line N"``) when it is reached,
    so the rows before it can be handled first."""
    where = where or (lambda i: f"{os.fspath(path)} line {i}")
    with open(path, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SafeshapeError(f"{where(i)}: not valid UTF-8 (byte {exc.start + 1} of the line: "
                                     f"{raw[exc.start:exc.start + 1]!r}); JSONL files must be UTF-8") from None
            if not line.strip():
                continue
            try:
                yield i, json.loads(line)
            except json.JSONDecodeError as exc:
                raise SafeshapeError(f"{where(i)}: not valid JSON ({exc.msg} at column {exc.colno})") from None


def read_jsonl(path: str | os.PathLike) -> list[tuple[int, dict]]:
    """``(line_number, row)`` for every non-blank line; a line that is not UTF-8 or not a JSON object is an error
    naming it."""
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise SafeshapeError(f"{path}: " + ("not a regular file" if os.path.exists(path) else "data file not found"))
    rows = []
    for i, row in iter_jsonl(path):
        if not isinstance(row, dict):
            raise SafeshapeError(f"{path} line {i}: a row must be a JSON object, not {type(row).__name__}")
        rows.append((i, row))
    if not rows:
        raise SafeshapeError(f"{path}: no rows")
    return rows


def read_rows(path: str | os.PathLike, split: str | None = None) -> tuple[str, list[tuple[int, dict]]]:
    """``(unit, rows)``: ``rows`` are ``(number, row)`` pairs, numbered by ``unit`` (``"line"`` of a text file or
    ``"row"`` of a table, 1-based)."""
    p = os.fspath(path)
    if os.path.isdir(p):
        return "row", _from_disk(p, split)
    if not os.path.isfile(p):
        raise SafeshapeError(f"{p}: data file not found")
    if split is not None:
        raise SafeshapeError(f"{p}: --split picks a split of a datasets.save_to_disk folder, not of a file")
    kind = os.path.splitext(p)[1].lower()
    if kind in (".parquet", ".csv"):
        return "row", _from_table(p, kind)
    _check_text(p, kind)
    if kind == ".json":
        with open(p, encoding="utf-8") as f:
            text = f.read()
        if text.lstrip().startswith("["):
            return "row", _from_json_array(p, text)
    return "line", read_jsonl(p)


def _check_text(p: str, kind: str) -> None:
    """A JSON(L) file must be UTF-8 text; binary files get a message naming what they look like."""
    with open(p, "rb") as f:
        head = f.read(1 << 16)
    for magic, name in _MAGIC.items():
        if head.startswith(magic):
            raise SafeshapeError(f"{p}: looks like a {name} file, not JSON lines; the data formats are {FORMATS}")
    if kind not in (".jsonl", ".json"):
        raise SafeshapeError(f"{p}: unknown data format {kind or '(no extension)'}; the data formats are {FORMATS}")
    with open(p, "rb") as f:
        for i, raw in enumerate(f, 1):
            try:
                raw.decode("utf-8")
            except UnicodeDecodeError as exc:
                raise SafeshapeError(f"{p} line {i}: not valid UTF-8 ({exc.reason} at byte {exc.start + 1} of the "
                                     f"line); the data formats are {FORMATS}") from None


def _from_json_array(p: str, text: str) -> list[tuple[int, dict]]:
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SafeshapeError(f"{p} line {exc.lineno}: not valid JSON ({exc.msg})") from None
    if not isinstance(rows, list):
        raise SafeshapeError(f"{p}: a JSON data file holds an array of row objects")
    for i, row in enumerate(rows, 1):
        if not isinstance(row, dict):
            raise SafeshapeError(f"{p} row {i}: a row must be a JSON object, not {type(row).__name__}")
    if not rows:
        raise SafeshapeError(f"{p}: no rows")
    return list(enumerate(rows, 1))


def _datasets(p: str):
    try:
        import datasets
    except ImportError:
        raise SafeshapeError(f"{p}: reading this format needs the `datasets` package "
                             "(pip install 'safeshape[data]'); JSONL and JSON need nothing extra") from None
    return datasets


def _clean(p: str, unit_rows) -> list[tuple[int, dict]]:
    """Arrow tables give every row every column (``None`` where a row had none): drop those, decode JSON cells."""
    rows = []
    for i, row in enumerate(unit_rows, 1):
        row = {k: v for k, v in row.items() if v is not None}
        for key in JSON_COLUMNS:
            if isinstance(row.get(key), str):
                try:
                    row[key] = json.loads(row[key])
                except json.JSONDecodeError as exc:
                    raise SafeshapeError(f"{p} row {i}: `{key}` is text but not JSON ({exc.msg})") from None
        rows.append((i, row))
    if not rows:
        raise SafeshapeError(f"{p}: no rows")
    return rows


def _from_table(p: str, kind: str) -> list[tuple[int, dict]]:
    datasets = _datasets(p)
    reader = datasets.Dataset.from_parquet if kind == ".parquet" else datasets.Dataset.from_csv
    # datasets writes an Arrow copy into its cache even when kept in memory: keep that out of the user's cache
    with tempfile.TemporaryDirectory(prefix="safeshape-data-") as cache:
        try:
            table = reader(p, keep_in_memory=True, cache_dir=cache)
        except Exception as exc:  # pyarrow and pandas raise many types for a malformed file
            raise SafeshapeError(f"{p}: cannot read it as {kind[1:]}: {type(exc).__name__}: {exc}") from exc
        return _clean(p, table.to_list())


def _from_disk(p: str, split: str | None) -> list[tuple[int, dict]]:
    datasets = _datasets(p)
    try:
        loaded = datasets.load_from_disk(p, keep_in_memory=True)
    except FileNotFoundError as exc:
        raise SafeshapeError(f"{p}: a folder, but not one written by datasets' save_to_disk; the data formats are "
                             f"{FORMATS}") from exc
    except Exception as exc:  # a damaged folder: arrow, JSON and schema errors of many types
        raise SafeshapeError(f"{p}: cannot read this datasets.save_to_disk folder: {type(exc).__name__}: "
                             f"{exc}") from exc
    if isinstance(loaded, datasets.DatasetDict):
        names = sorted(loaded)
        if split is None and len(names) == 1:
            split = names[0]
        if split not in loaded:
            raise SafeshapeError(f"{p}: {'--split ' + repr(split) + ' is not' if split else 'pass --split, one of'} "
                                 f"the dataset's splits: {', '.join(names)}")
        loaded = loaded[split]
    elif split is not None:
        raise SafeshapeError(f"{p}: --split {split}: this folder holds one Dataset, not a DatasetDict with splits")
    try:
        rows = loaded.to_list()
    except Exception as exc:  # the arrow files disagree with the folder's schema (e.g. a column it does not name)
        raise SafeshapeError(f"{p}: cannot read the rows of this datasets.save_to_disk folder "
                             f"{'(split ' + split + ') ' if split else ''}: {type(exc).__name__}: {exc}") from exc
    return _clean(f"{p}", rows)


def fingerprint(path: str | os.PathLike) -> str:
    """SHA-256 of a data file, or of every file of a data folder (names and contents), for --resume checks."""
    p = os.fspath(path)
    h = hashlib.sha256()
    files = [p] if os.path.isfile(p) else sorted(os.path.join(d, f) for d, _, fs in os.walk(p) for f in fs)
    for name in files:
        if files != [p]:
            h.update(os.path.relpath(name, p).encode() + b"\0")
        with open(name, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
