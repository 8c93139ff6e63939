"""Outputs that never lose anything: written to a temporary sibling and renamed into place; an existing output is
refused unless the caller asks to overwrite; an output may never be (or contain, or sit inside) an input.

Links: an output is never written through a symbolic link the run did not create (a link planted at OUT, at a file
inside an output folder, or dangling): it is refused before any work, named with its target. Replacing: an existing
output *folder* is replaced (``--overwrite``) only when safeshape wrote it, recognised by the manifest
``.safeshape-output.json`` every output folder gets (or when it is empty); anything else is refused, never deleted.

Crash safety: temporaries are named ``.<name>.tmp-<pid>-*`` / ``.<name>.old-<pid>-*`` next to the output.
Replacing an existing folder is one atomic exchange (Linux ``renameat2(RENAME_EXCHANGE)``) where the OS has it;
elsewhere the old folder is parked in ``.<name>.old-<pid>-*/x`` for the moment between two renames, and the next
run that writes the same output puts it back if that run was killed in between. Temporaries of dead processes
are removed (and said so on stderr) by the next run that writes next to them. Files and folders get the
permissions the umask allows (mkstemp/mkdtemp would leave them 0600/0700).
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import warnings
from pathlib import Path
from typing import Iterable

from .errors import SafeshapeError

# ".<name>.tmp-<pid>-<mkdtemp suffix>"; without the pid: left by a version that did not record it (taken as dead)
_TEMP = re.compile(r"^\.(?P<name>.+)\.(?P<kind>tmp|old)-(?:(?P<pid>\d+)-)?[a-z0-9_]{8}$")


_REPORT_STREAM = None  # the real stdout while a --json command runs under json_stdout()


@contextlib.contextmanager
def json_stdout():
    """For ``--json``: stdout carries the JSON report alone. While the command runs, anything printed to stdout
    (deepspeed's logger writes its accelerator warning there when transformers imports it) goes to stderr;
    ``print_json`` writes to the real stdout."""
    global _REPORT_STREAM
    _REPORT_STREAM = sys.stdout
    # logging handlers made before this (a library imported earlier) hold stdout itself: point them at stderr too
    loggers = [logging.getLogger()] + [lg for lg in logging.Logger.manager.loggerDict.values()
                                       if isinstance(lg, logging.Logger)]
    moved = [h for lg in loggers for h in lg.handlers
             if isinstance(h, logging.StreamHandler) and h.stream is _REPORT_STREAM]
    for h in moved:
        h.setStream(sys.stderr)
    try:
        with contextlib.redirect_stdout(sys.stderr):
            yield
    finally:
        for h in moved:
            h.setStream(_REPORT_STREAM)
        _REPORT_STREAM = None


def json_main(main):
    """Decorates a subcommand's ``main(args)``: with ``args.json`` it runs under ``json_stdout()``."""
    @functools.wraps(main)
    def run(args):
        if not getattr(args, "json", False):
            return main(args)
        with json_stdout():
            return main(args)
    return run


def print_json(obj, **dumps_kwargs) -> None:
    """The ``--json`` report on stdout (the real one under ``json_stdout``)."""
    print(json.dumps(obj, **dumps_kwargs), file=_REPORT_STREAM or sys.stdout, flush=True)


#: left in every output folder safeshape writes: --overwrite replaces only folders that hold it
MANIFEST = ".safeshape-output.json"


def refuse_link(path: str | os.PathLike, what: str = "--out") -> None:
    """Raise SafeshapeError when ``path`` is a symbolic link (dangling or not): writing there would write (or
    delete) wherever the link points, something the user never named as an output."""
    if os.path.islink(path):
        try:
            target = os.readlink(path)
        except OSError:
            target = "?"
        raise SafeshapeError(f"{what} {path}: is a symbolic link (to {target}); safeshape never writes through a link "
                             "it did not create: remove the link or choose another path")


def refuse_links_below(root: str | os.PathLike, names: Iterable[str], what: str = "--out") -> None:
    """``refuse_link`` for each of ``names`` inside the folder ``root`` (the files an output folder holds)."""
    for name in names:
        refuse_link(Path(root) / name, what)


def is_our_output(folder: str | os.PathLike) -> bool:
    """Whether ``folder`` is an output folder safeshape wrote (it holds the manifest, a regular file)."""
    m = Path(folder) / MANIFEST
    return m.is_file() and not m.is_symlink()


def check_replaceable(folder: str | os.PathLike, what: str = "--out") -> None:
    """Refuse to replace an existing non-empty folder that safeshape did not write (no manifest): ``--overwrite``
    replaces only our own outputs, so a mistyped --out never deletes someone's files."""
    folder = Path(folder)
    if folder.is_dir() and not folder.is_symlink() and any(folder.iterdir()) and not is_our_output(folder):
        raise SafeshapeError(f"{what} {folder}: --overwrite replaces only an output folder safeshape wrote (it holds "
                             f"{MANIFEST}); this one does not and is left as it is: remove it yourself or choose "
                             "another path")


def write_manifest(folder: str | os.PathLike, command: str) -> None:
    """Mark ``folder`` (being written by this run) as a safeshape output of ``command``."""
    from . import __version__

    path = Path(folder) / MANIFEST
    refuse_link(path, command)
    with open(path, "w", encoding="utf-8") as f:
        json.dump({"safeshape_output": 1, "command": command, "version": __version__}, f)
        f.write("\n")
    apply_umask(path)


def _overlaps(a: Path, b: Path) -> bool:
    return a == b or a in b.parents or b in a.parents


def _why(exc: OSError) -> str:
    return exc.strerror or str(exc)


def check_output_path(out: str | os.PathLike, overwrite: bool, inputs: Iterable[tuple[str, str | os.PathLike]] = (),
                      what: str = "--out", keep: bool = False, ours: bool = False) -> Path:
    """Validate an output path against the inputs ``[(argument name, path), ...]``; returns it resolved.

    A link at ``out`` is refused (:func:`refuse_link`); an existing folder is replaced (``overwrite``) only when it
    is ours (:func:`check_replaceable`). ``keep=True``: an existing output is the caller's to judge (a run to
    resume), only links, overlaps and writability are checked here; ``ours=True``: the caller knows ``out`` is its
    own (a checkpoint inside a run folder of ours), so no manifest is asked for. Also checks that the output can be created
    (its nearest existing parent is a writable folder), so a run fails before any work rather than after it, and
    finishes what killed runs left for this output."""
    refuse_link(out, what)
    out_r = Path(out).resolve()
    for name, inp in inputs:
        if inp is not None and _overlaps(out_r, Path(inp).resolve()):
            raise SafeshapeError(f"{what} {out} overlaps the input {name} {inp}: inputs are never written over")
    with contextlib.suppress(OSError):
        recover_interrupted(out_r.parent, out_r.name)  # a killed run may have moved the old output aside
    if out_r.exists() and not keep:
        if not overwrite:
            raise SafeshapeError(f"{what} {out} already exists: pass --overwrite (overwrite=True) to replace it")
        if not ours:
            check_replaceable(out_r, what)
    parent = out_r.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise SafeshapeError(f"{what} {out}: {parent} is not a folder")
    if not os.access(parent, os.W_OK | os.X_OK):
        raise SafeshapeError(f"{what} {out}: the folder {parent} is not writable")
    return out_r


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _is_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    else:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def recover_interrupted(parent: str | os.PathLike, name: str | None = None, report=True) -> list[str]:
    """Finish what killed runs left in ``parent`` (only for output ``name`` when given): an output parked in an
    ``.old`` folder while nothing took its place is put back; every other temporary of a dead process is
    removed. Returns one line per action (also printed on stderr when ``report``)."""
    parent = Path(parent)
    if not parent.is_dir():
        return []
    actions = []
    for entry in sorted(parent.iterdir()):
        m = _TEMP.match(entry.name)
        if not m or (name is not None and m["name"] != name) or (m["pid"] and _is_alive(int(m["pid"]))):
            continue
        target = parent / m["name"]
        if m["kind"] == "old" and os.path.lexists(entry / "x") and not os.path.lexists(target):
            os.rename(entry / "x", target)
            actions.append(f"restored {target} (a killed run had moved it aside to replace it)")
        else:
            actions.append(f"removed {entry} (left by a killed run)")
        _remove(entry)
    if report:
        for line in actions:
            print(f"safeshape: {line}", file=sys.stderr)
    return actions


_RENAME_EXCHANGE = 2
_AT_FDCWD = -100


def _renameat2():
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return None
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    return fn


_RENAMEAT2 = _renameat2() if sys.platform.startswith("linux") else None


def exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False when the OS or file system cannot (the caller falls back)."""
    if _RENAMEAT2 is None:
        return False
    if _RENAMEAT2(_AT_FDCWD, os.fsencode(a), _AT_FDCWD, os.fsencode(b), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.ENOTSUP, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(a))


def _swap_in(tmp: Path, out: Path) -> None:
    """Put ``tmp`` at ``out``; an existing ``out`` is replaced so that a kill at any point leaves the old or the
    new one there (or, between the two renames of the fallback, the old one recoverable by the next run)."""
    if not os.path.lexists(out):
        os.rename(tmp, out)
        return
    if exchange(tmp, out):  # tmp now holds the old output
        _remove(tmp)
        return
    old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old-{os.getpid()}-", dir=out.parent))
    os.rename(out, old / "x")
    try:
        os.rename(tmp, out)
    except BaseException:
        os.rename(old / "x", out)  # put the old output back before reporting the failure
        _remove(old)
        raise
    _remove(old)


def apply_umask(*paths: str | os.PathLike) -> None:
    """Give files (0666) and folders (0777) the mode the umask allows: mkstemp/mkdtemp and some writers (the
    safetensors library) create them 0600/0700 whatever the umask."""
    mask = _umask()
    for p in paths:
        os.chmod(p, (0o777 if os.path.isdir(p) else 0o666) & ~mask)


@contextlib.contextmanager
def atomic_output_dir(out: str | os.PathLike, overwrite: bool = False, inputs=(), what: str = "--out",
                      command: str | None = None, ours: bool = False):
    """Yield a temporary folder next to ``out``; on success it replaces ``out`` in one rename (or exchange).
    The folder gets the manifest (:data:`MANIFEST`, naming ``command``, default ``what``) that lets a later
    ``--overwrite`` replace it; ``ours=True`` (a folder inside an output of ours, e.g. a checkpoint): no manifest
    is written or asked for.

    An OSError while writing (full disk, permissions) becomes a SafeshapeError naming ``out``; the temporary
    folder is removed and ``out`` is left as it was."""
    out_r = check_output_path(out, overwrite, inputs, what=what, ours=ours)
    try:
        out_r.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{out_r.name}.tmp-{os.getpid()}-", dir=out_r.parent))
        apply_umask(tmp)
        if not ours:
            write_manifest(tmp, command or what)
    except OSError as exc:
        raise SafeshapeError(f"{what} {out}: cannot create it: {_why(exc)}") from None
    try:
        yield tmp
        _swap_in(tmp, out_r)
    except OSError as exc:
        _remove(tmp)
        raise SafeshapeError(f"{what} {out}: writing failed, nothing was written: {_why(exc)}") from None
    except BaseException:
        _remove(tmp)
        raise


def install_files(staged: Path, dest: Path, names: list[str]) -> None:
    """Move the files ``names`` from the folder ``staged`` into ``dest``, one rename each, in order. The last
    name is the marker readers open first (e.g. a PEFT adapter's config): it is removed before the others are
    replaced and renamed in last, so a kill in between never pairs it with files of another write."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(dest / names[-1])
    for name in names:
        os.replace(staged / name, dest / name)


def split_torn_tail(data: bytes) -> tuple[list[bytes], bytes]:
    """An appended-to JSONL file's bytes as ``(complete lines without their newlines, torn tail)``: the torn tail is
    an incomplete last line (no newline) that a crash in mid-write left, ``b""`` when the file ends with one."""
    keep = data.rfind(b"\n") + 1
    return data[:keep].split(b"\n")[:-1], data[keep:]


def cut_torn_tail(path: str | os.PathLike, data: bytes, what: str = "--out") -> None:
    """Remove the torn tail of ``data`` (``path``'s bytes as just read and validated) from the file, in place, with a
    warning; nothing when there is none. The one repair of a crash's torn last line (star's annotations, eval's
    responses, the trainer's metrics)."""
    _, torn = split_torn_tail(data)
    if not torn:
        return
    refuse_link(path, what)
    warnings.warn(f"{os.fspath(path)}: removing an incomplete last line ({len(torn)} bytes) left by an interrupted "
                  "run", stacklevel=3)
    with open(path, "r+b") as f:
        f.truncate(len(data) - len(torn))


def atomic_write_text(path: str | os.PathLike, text: str, overwrite: bool = False, inputs=(),
                      what: str = "output") -> Path:
    return atomic_write_bytes(path, [text.encode("utf-8")], overwrite=overwrite, inputs=inputs, what=what)


def atomic_write_bytes(path: str | os.PathLike, chunks: bytes | Iterable[bytes], overwrite: bool = False, inputs=(),
                       what: str = "output") -> Path:
    """Write ``chunks`` (one bytes object, or an iterable streamed, e.g. lines) to a temporary sibling, sync it and
    rename it over ``path``."""
    if isinstance(chunks, (bytes, bytearray, memoryview)):
        chunks = [chunks]
    with atomic_output_file(path, overwrite, inputs, what) as tmp:
        with open(tmp, "wb") as f:
            for chunk in chunks:
                f.write(chunk)
            f.flush()
            os.fsync(f.fileno())
    return Path(path).resolve()


def write_json(path: str | os.PathLike, obj, overwrite: bool = False, inputs=(), what: str = "report") -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2) + "\n", overwrite=overwrite, inputs=inputs, what=what)


@contextlib.contextmanager
def atomic_output_file(path: str | os.PathLike, overwrite: bool = False, inputs=(), what: str = "output"):
    """Yield a temporary path next to ``path`` for a writer that wants a file name (a plot, a JSONL another function
    writes); on success it is renamed over ``path``, on failure removed (named like every temporary here, so
    ``recover_interrupted`` removes one a killed run left)."""
    p = check_output_path(path, overwrite, inputs, what=what)
    try:
        p.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{p.name}.tmp-{os.getpid()}-", dir=p.parent)
        os.close(fd)
    except OSError as exc:
        raise SafeshapeError(f"{what} {path}: cannot create it: {_why(exc)}") from None
    try:
        yield Path(tmp)
        apply_umask(tmp)
        os.replace(tmp, p)
    except OSError as exc:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise SafeshapeError(f"{what} {path}: writing failed, nothing was written: {_why(exc)}") from None
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
