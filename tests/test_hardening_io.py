"""safeshape.io: the --overwrite swap is crash-safe (atomic exchange, or a parked old folder that the next run puts
back), temporaries of killed runs are removed and reported, failures become SafeshapeErrors."""
import os
import subprocess
import sys
import warnings

import pytest

from safeshape import io
from safeshape.errors import SafeshapeError


def dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


def write_out(out, text, **kw):
    with io.atomic_output_dir(out, **kw) as tmp:
        (tmp / "f.txt").write_text(text)


def fail_renames(monkeypatch, nth: int, exc: BaseException, every_later: bool) -> None:
    """os.rename raises ``exc`` at its ``nth`` call (and every later one when ``every_later``)."""
    real_rename, calls = os.rename, []

    def rename(src, dst):
        calls.append(dst)
        if len(calls) == nth or (every_later and len(calls) > nth):
            raise exc
        return real_rename(src, dst)

    monkeypatch.setattr(os, "rename", rename)


def leftovers(parent, name="out"):
    return sorted(p.name for p in parent.iterdir() if p.name.startswith(f".{name}."))


@pytest.mark.parametrize("use_exchange", [True, False])
def test_overwrite_replaces(tmp_path, monkeypatch, use_exchange):
    if not use_exchange:
        monkeypatch.setattr(io, "exchange", lambda a, b: False)
    out = tmp_path / "out"
    write_out(out, "old")
    with pytest.raises(SafeshapeError, match="already exists"):
        write_out(out, "new")
    write_out(out, "new", overwrite=True)
    assert (out / "f.txt").read_text() == "new" and leftovers(tmp_path) == []


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="renameat2 is Linux")
def test_exchange_is_atomic_swap(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    a.mkdir()
    b.mkdir()
    (a / "x").write_text("A")
    (b / "x").write_text("B")
    assert io.exchange(a, b)
    assert (a / "x").read_text() == "B" and (b / "x").read_text() == "A"


def test_kill_between_the_two_renames_is_recovered(tmp_path, monkeypatch):
    """The fallback's window: OUT moved aside, the new one not yet in. The next run puts the old one back."""
    out = tmp_path / "out"
    write_out(out, "old")
    # what a run killed in that window leaves (its pid is dead now)
    pid = dead_pid()
    parked = tmp_path / f".out.old-{pid}-abcd1234"
    parked.mkdir()
    os.rename(out, parked / "x")
    (tmp_path / f".out.tmp-{pid}-efgh5678").mkdir()  # the new output, never committed
    assert not out.exists()
    with pytest.raises(SafeshapeError, match="already exists"):
        write_out(out, "new")  # without --overwrite: the old output is back and kept
    assert (out / "f.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_kill_in_fallback_swap_then_rerun(tmp_path, monkeypatch):
    """Simulate the kill inside _swap_in itself (fallback path), then recover as another process would."""
    monkeypatch.setattr(io, "exchange", lambda a, b: False)
    out = tmp_path / "out"
    write_out(out, "old")
    real_rename = os.rename
    # "killed" after OUT was moved aside: nothing runs after this point (the restore fails too)
    fail_renames(monkeypatch, 2, KeyboardInterrupt(), every_later=True)
    with pytest.raises(KeyboardInterrupt):
        write_out(out, "new", overwrite=True)
    monkeypatch.setattr(os, "rename", real_rename)
    assert not out.exists()
    monkeypatch.setattr(io, "_is_alive", lambda pid: False)  # as seen from the next process
    write_out(out, "newer", overwrite=True)
    assert (out / "f.txt").read_text() == "newer" and leftovers(tmp_path) == []


def test_failed_fallback_rename_puts_the_old_output_back(tmp_path, monkeypatch):
    monkeypatch.setattr(io, "exchange", lambda a, b: False)
    out = tmp_path / "out"
    write_out(out, "old")
    fail_renames(monkeypatch, 2, OSError(28, "No space left on device"), every_later=False)
    with pytest.raises(SafeshapeError, match="No space left"):
        write_out(out, "new", overwrite=True)
    assert (out / "f.txt").read_text() == "old" and leftovers(tmp_path) == []


def test_stale_temporaries_removed_and_reported(tmp_path, capsys):
    pid = dead_pid()
    for name in (f".out.tmp-{pid}-abcd1234", ".out.tmp-zz9_x8y7", f".out.old-{pid}-qwer5678"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "big.bin").write_bytes(b"0" * 1000)
    (tmp_path / f".out.tmp-{os.getpid()}-live1234").mkdir()  # a live process's: kept
    (tmp_path / ".other.tmp-12-abcd1234").mkdir()  # another output's: kept
    write_out(tmp_path / "out", "x")
    err = capsys.readouterr().err
    assert err.count("left by a killed run") == 3
    assert leftovers(tmp_path) == [f".out.tmp-{os.getpid()}-live1234"]
    assert (tmp_path / ".other.tmp-12-abcd1234").exists()


def test_errors_are_safeshape_errors(tmp_path, monkeypatch):
    (tmp_path / "file").write_text("x")
    with pytest.raises(SafeshapeError, match="is not a folder"):
        io.write_json(tmp_path / "file" / "r.json", {})
    (tmp_path / "d.json").mkdir()
    with pytest.raises(SafeshapeError, match=r"d\.json: writing failed"):
        io.write_json(tmp_path / "d.json", {}, overwrite=True)
    assert [p.name for p in (tmp_path).iterdir() if p.name.startswith(".")] == []


def test_write_text_respects_umask(tmp_path):
    old = os.umask(0o027)
    try:
        io.write_json(tmp_path / "r.json", {"a": 1})
        write_out(tmp_path / "out", "x")
    finally:
        os.umask(old)
    assert (tmp_path / "r.json").stat().st_mode & 0o777 == 0o640
    assert (tmp_path / "out").stat().st_mode & 0o777 == 0o750


@pytest.mark.parametrize("tail", [b"", b'{"a": 3', b'{"a": 3}'])  # nothing, a torn line, a line short of its newline
def test_torn_tail_is_cut_and_complete_lines_are_kept(tmp_path, tail):
    from safeshape.io import cut_torn_tail, split_torn_tail

    p = tmp_path / "rows.jsonl"
    data = b'{"a": 1}\n\n{"a": 2}\n' + tail
    p.write_bytes(data)
    lines, torn = split_torn_tail(data)
    assert lines == [b'{"a": 1}', b"", b'{"a": 2}'] and torn == tail
    assert split_torn_tail(tail) == ([], tail)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        cut_torn_tail(p, data)
    assert p.read_bytes() == b'{"a": 1}\n\n{"a": 2}\n'
    assert [str(w.message) for w in caught] == ([f"{p}: removing an incomplete last line ({len(tail)} bytes) left by "
                                                 "an interrupted run"] if tail else [])


def test_torn_tail_is_not_cut_through_a_link(tmp_path):
    from safeshape.io import cut_torn_tail

    target, link = tmp_path / "target.jsonl", tmp_path / "link.jsonl"
    target.write_bytes(b'{"a": 1}\n{"a"')
    link.symlink_to(target)
    with pytest.raises(SafeshapeError, match="symbolic link"):
        cut_torn_tail(link, target.read_bytes())
    assert target.read_bytes() == b'{"a": 1}\n{"a"'
