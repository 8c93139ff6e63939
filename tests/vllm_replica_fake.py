"""A stand-in engine for tests/test_vllm.py's tests of safeshape.vllm_support.Replicas, imported by the spawned
replica processes (kept free of torch so that they start in a moment). Each replica knows its index from the
environment the parent gave it (FAKE_REPLICA)."""
import os
import signal
import threading

WATCHED = ("FAKE_REPLICA", "CUDA_VISIBLE_DEVICES", "VLLM_CPU_OMP_THREADS_BIND", "VLLM_DP_SIZE")


class FakeEngine:
    def __init__(self, fail_start: int | None = None):
        self.replica = int(os.environ["FAKE_REPLICA"])
        self.env = {k: os.environ.get(k) for k in WATCHED}  # as set before this module was imported
        if self.replica == fail_start:
            raise ValueError(f"replica {self.replica} cannot start")

    def echo(self, items, tag):
        return [(x, tag, self.replica) for x in items]

    def environment(self):
        return self.env

    def fail(self, items, how):
        """Replica 1 fails (``how``: raise, exit or kill); replica 0 answers (``answer``) or never does (``hang``)."""
        if self.replica == 1:
            if how == "raise":
                raise RuntimeError("the engine broke on item " + repr(items[0]))
            if how == "exit":
                os._exit(3)
            os.kill(os.getpid(), signal.SIGKILL)
        if how.endswith("hang"):
            threading.Event().wait()  # a replica that never answers: the parent must not wait for it
        return items

    def close(self):
        pass
