"""The world's data for the fine-tuning runs, each a cached stage of a seed: the fine-tuning rows, their STAR
values from the guard (``safeshape star``'s generic preset) and rejection sampling's per-row flags."""
from __future__ import annotations

from pathlib import Path

from ..io import atomic_output_file
from .settings import RS_THRESHOLD, STAR_CHUNK_WORDS, write_jsonl_file


class DataStages:
    """Mixed into :class:`.pipeline.Demo` (which gives ``_stage``, the folders, the worlds and the profile)."""

    def make_finetune_data(self, seed: int) -> Path:
        def make(path: Path):
            rows = self.world(seed).finetune_rows(self.profile.finetune_rows, self.profile.harmful_share)
            write_jsonl_file(path, ({"prompt": r.prompt, "response": r.response} for r in rows))

        return self._stage(f"seed {seed}: fine-tuning data", self.seed_dir(seed) / "data" / "finetune.jsonl", make)

    def make_star_data(self, seed: int) -> Path:
        """STAR values from the guard through ``safeshape star``'s generic preset."""
        data, guard_dir = self.make_finetune_data(seed), self.make_guard(seed)

        def make(path: Path):
            from safeshape import star

            from .tokenizer import GUARD_SAFE, GUARD_UNSAFE, GUARD_VERDICT_PREFIX

            guard, tok = star.load_guard(str(guard_dir))
            preset = star.GuardPreset(safe=GUARD_SAFE, unsafe=GUARD_UNSAFE, verdict_prefix=GUARD_VERDICT_PREFIX)
            with atomic_output_file(path, overwrite=True) as tmp:
                star.annotate_file(guard, tok, str(data), str(tmp), preset, chunk_words=STAR_CHUNK_WORDS,
                                   engine="shared", progress=self.progress, overwrite=True)

        return self._stage(f"seed {seed}: STAR annotation (guard)", self.seed_dir(seed) / "data" / "finetune_star.jsonl",
                           make)

    def make_rs_data(self, seed: int) -> Path:
        """Rejection sampling's per-row flag: the guard's verdict on the whole response (its last STAR value)."""
        star_path = self.make_star_data(seed)

        def make(path: Path):
            from safeshape.datafiles import read_jsonl

            rows = [row for _, row in read_jsonl(star_path)]  # errors name the line (invalid UTF-8, not JSON)
            write_jsonl_file(path, ({"prompt": r["prompt"], "response": r["response"],
                                 "safe": bool(r["star_values"][-1] >= RS_THRESHOLD)} for r in rows))

        return self._stage(f"seed {seed}: RS flags (guard)", self.seed_dir(seed) / "data" / "finetune_rs.jsonl", make)
