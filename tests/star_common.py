"""Shared, cached tiny guards for the STAR tests (built once per test process)."""
import functools

from safeshape.star import tiny


@functools.lru_cache(maxsize=None)
def tokenizer():
    return tiny.build_tokenizer()


@functools.lru_cache(maxsize=None)
def guard(attn_implementation="sdpa", seed=0):
    """(model, tokenizer): a tiny random Llama guard with a Llama-Guard-3-like chat template."""
    tok = tokenizer()
    return tiny.build_model(len(tok), seed=seed, attn_implementation=attn_implementation), tok


def one_thread():
    """Run a test with one intra-op thread: the tiny guard's ops are far too small to split, and on a loaded
    machine the thread hand-offs cost more than the work. Restores the previous setting."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(previous)
