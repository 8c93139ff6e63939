"""Helpers shared by the tests/test_hardening_*.py files."""
import contextlib
import signal


@contextlib.contextmanager
def deadline(seconds: int):
    """Fail (instead of hanging CI) if the body blocks, e.g. on opening a FIFO."""
    def fail(*_):
        raise TimeoutError(f"blocked for {seconds} s")

    old = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
