"""Fault injection for tests/test_hardening_faults.py: run `safeshape` commands in forked children and kill -9
them at chosen points. Imports torch/safeshape once, then forks per step (a fresh interpreter per run would cost
seconds each).

    python tests/fault_runner.py STEPS.json RESULTS.json

STEPS.json: a list of steps, each
  {"argv": [...safeshape args...], "kill": null | "before:N" | "after:N" | "rows:N:PATH" | "exists:GLOB",
   "exchange": true|false,
   "snapshot": "folder to hash after the step" (optional)}
``before:N``/``after:N`` SIGKILL the child itself just before/after its N-th commit point: a call of os.rename,
os.replace, safeshape.io.exchange or safetensors.torch.save_file. Kills at an observable event, whatever the
machine's load: ``rows:N:PATH`` once the file PATH holds N complete lines, ``exists:GLOB`` once a path matching
GLOB exists (a checkpoint folder, a temporary). ``time:S`` (after S seconds) is kept for manual experiments only:
a test must not depend on how fast the machine is.
``exchange: false`` makes safeshape.io take its fallback path (no renameat2).
RESULTS.json: per step ``{"status": "exit:RC" | "killed", "points": number of commit points passed,
"snapshot": {relative path: sha256}}``.
"""
import glob
import hashlib
import json
import os
import shutil
import signal
import sys
import time

import safetensors.torch

import safeshape.cli
from safeshape import io


def snapshot(folder):
    if not folder or not os.path.isdir(folder):
        return None
    out = {}
    for root, _, files in os.walk(folder):
        for name in files:
            p = os.path.join(root, name)
            with open(p, "rb") as f:
                out[os.path.relpath(p, folder)] = hashlib.sha256(f.read()).hexdigest()
    return out


def child(step, count_fd):
    kill = step.get("kill") or ""
    when, _, n = kill.partition(":")
    target = int(n) if when in ("before", "after") else -1
    count = [0]

    def hooked(fn):
        def wrapper(*a, **k):
            count[0] += 1
            os.write(count_fd, b".")
            if count[0] == target and when == "before":
                os.kill(os.getpid(), signal.SIGKILL)
            result = fn(*a, **k)
            if count[0] == target and when == "after":
                os.kill(os.getpid(), signal.SIGKILL)
            return result
        return wrapper

    os.rename, os.replace = hooked(os.rename), hooked(os.replace)
    if hasattr(io, "exchange"):  # (absent in versions before the crash-safe swap)
        io.exchange = hooked(io.exchange if step.get("exchange", True) else (lambda a, b: False))
    safetensors.torch.save_file = hooked(safetensors.torch.save_file)
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, 1)
    rc = safeshape.cli.main(step["argv"])
    os._exit(rc)


def _lines(path):
    try:
        with open(path, "rb") as f:
            return f.read().count(b"\n")
    except FileNotFoundError:
        return 0


def _event(kill):
    """A callable that is true once the kill's event happened (None: the child kills itself, or no kill)."""
    kind, _, arg = kill.partition(":")
    if kind == "rows":
        n, _, path = arg.partition(":")
        return lambda: _lines(path) >= int(n)
    if kind == "exists":
        return lambda: bool(glob.glob(arg))
    if kind == "time":
        deadline = time.monotonic() + float(arg)
        return lambda: time.monotonic() >= deadline
    return None


def main():
    steps = json.load(open(sys.argv[1]))
    results = []
    for step in steps:
        if "copy" in step:  # {"copy": [src, dst]}: dst becomes a fresh copy of src
            src, dst = step["copy"]
            shutil.rmtree(dst, ignore_errors=True)
            shutil.copytree(src, dst, symlinks=True)
            results.append({"status": "copied"})
            continue
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(r)
            try:
                child(step, w)
            finally:
                os._exit(99)
        os.close(w)
        kill = step.get("kill") or ""
        status = None
        event = _event(kill)
        if event is not None:
            while not event():
                done, st = os.waitpid(pid, os.WNOHANG)
                if done:  # the run ended before the event
                    status = st
                    break
                time.sleep(0.002)
            else:
                os.kill(pid, signal.SIGKILL)
        points = 0
        while chunk := os.read(r, 4096):
            points += len(chunk)
        os.close(r)
        if status is None:
            _, status = os.waitpid(pid, 0)
        sig = os.WTERMSIG(status) if os.WIFSIGNALED(status) else None
        results.append({"status": "killed" if sig == signal.SIGKILL else f"exit:{os.waitstatus_to_exitcode(status)}",
                        "points": points, "snapshot": snapshot(step.get("snapshot"))})
    json.dump(results, open(sys.argv[2], "w"), indent=1)


if __name__ == "__main__":
    main()
