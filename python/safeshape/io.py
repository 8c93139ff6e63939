"""Outputs that never lose anything: written to a temporary sibling and renamed into place; an existing output is
refused unless the caller asks to overwrite; an output may never be (or contain, or sit inside) an input."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterable

from .errors import SafeshapeError


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def check_output_path(out: str | os.PathLike, overwrite: bool, inputs: Iterable[tuple[str, str | os.PathLike]] = (),
                      what: str = "--out") -> Path:
    """Validate an output path against the inputs ``[(argument name, path), ...]``; returns it resolved."""
    out_r = Path(out).resolve()
    for name, inp in inputs:
        if inp is not None and _overlaps(out_r, Path(inp).resolve()):
            raise SafeshapeError(f"{what} {out} overlaps the input {name} {inp}: inputs are never written over")
    if out_r.exists() and not overwrite:
        raise SafeshapeError(f"{what} {out} already exists: pass --overwrite (overwrite=True) to replace it")
    return out_r


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs=()):
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename."""
    out_r = check_output_path(out, overwrite, inputs)
    out_r.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_r.name}.tmp-", dir=out_r.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if out_r.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out_r.name}.old-", dir=out_r.parent))
        os.rename(out_r, old / "x")
        os.rename(tmp, out_r)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, out_r)


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False, inputs=(),
                      what: str = "output") -> Path:
    return atomic_write_bytes(path, [text.encode("utf-8")], overwrite=overwrite, inputs=inputs, what=what)


def atomic_write_bytes(path: str | os.PathLike, chunks: Iterable[bytes], overwrite: bool = False, inputs=(),
                       what: str = "output") -> Path:
    """Write ``chunks`` (streamed, e.g. lines) to a temporary sibling, sync it and rename it over ``path``."""
    p = check_output_path(path, overwrite, inputs, what=what)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-", dir=p.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
    return p


def write_json(path: str | os.PathLike, obj, overwrite: bool = False, inputs=(), what: str = "report") -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", overwrite=overwrite, inputs=inputs, what=what)


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, overwrite: bool = False, inputs=(), what: str = "output"):
    """Yield a temporary path next to ``path`` for a writer that wants a file name (a plot, a JSONL another function
    writes); on success it replaces ``path`` in one rename, on failure it is removed."""
    p = check_output_path(path, overwrite, inputs, what=what)
    p.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{p.stem}.tmp-", suffix=p.suffix, dir=p.parent)
    os.close(fd)
    try:
        yield Path(tmp)
        os.replace(tmp, p)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
