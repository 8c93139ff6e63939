"""The demo's models, each a cached stage: the base policy (pretrained to comply with everything), the aligned
policy (the base taught to refuse harmful requests) at each width, and the guard of each seed; trained with all
weights by :mod:`.models` and saved with their tokenizers."""
from __future__ import annotations

import random
from pathlib import Path

from ..io import atomic_output_dir
from .settings import STAR_CHUNK_WORDS, write_jsonl_file


class ModelStages:
    """Mixed into :class:`.pipeline.Demo` (which gives ``_stage``, the folders, the worlds and the profile)."""

    def _trained_model(self, name: str, path: Path, start, stream, make_batch, steps: int, lr: float,
                       desc: str, tokenizer) -> Path:
        """A stage that trains all weights of ``start()`` on ``stream`` and saves the model with its tokenizer."""
        from . import models as M

        def make(out: Path):
            model, log = start(), []
            M.train_full(model, M.batches_from(stream, make_batch, self.profile.batch_size), steps, lr, desc,
                         self.progress, log)
            with atomic_output_dir(out) as tmp:
                model.save_pretrained(tmp)
                tokenizer.save_pretrained(tmp)
                write_jsonl_file(tmp / "train_log.jsonl", log)

        return self._stage(name, path, make)

    def make_base(self, seed: int, width: int) -> Path:
        from . import models as M
        from .tokenizer import policy_tokenizer

        p, tok = self.profile, policy_tokenizer()
        return self._trained_model(
            f"seed {seed} width {width}: base model", self.cell_dir(seed, width) / "base",
            lambda: M.tiny_llama(tok, seed, hidden=width, layers=p.layers),
            self.world(seed).pretrain_stream(random.Random(seed + 10)), lambda ex: M.policy_batch(tok, ex),
            p.base_steps, p.base_lr, "base model (comply with everything)", tok)

    def make_aligned(self, seed: int, width: int) -> Path:
        from ..models import load_causal_lm
        from . import models as M
        from .tokenizer import policy_tokenizer

        p, tok, base = self.profile, policy_tokenizer(), self.make_base(seed, width)
        return self._trained_model(
            f"seed {seed} width {width}: aligned model", self.cell_dir(seed, width) / "aligned",
            lambda: load_causal_lm(base, flag="demo base model"),
            self.world(seed).align_stream(random.Random(seed + 11)), lambda ex: M.policy_batch(tok, ex),
            p.align_steps, p.align_lr, "aligned model (refuse harmful requests)", tok)

    def make_guard(self, seed: int) -> Path:
        from . import models as M
        from .tokenizer import guard_tokenizer

        p, tok = self.profile, guard_tokenizer()
        return self._trained_model(
            f"seed {seed}: guard model", self.seed_dir(seed) / "guard",
            lambda: M.tiny_llama(tok, seed + 1, hidden=p.hidden, layers=p.layers),
            self.world(seed).guard_stream(random.Random(seed + 12), STAR_CHUNK_WORDS),
            lambda rows: M.guard_batch(tok, rows), p.guard_steps, p.guard_lr,
            "guard model (safe/unsafe per partial response)", tok)

