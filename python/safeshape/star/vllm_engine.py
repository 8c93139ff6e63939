"""A guard served by vLLM (``safeshape star --engine vllm``, ``safeshape eval --engine vllm``'s judge).

Every guard sequence is one request of our exact ids (rendered and tokenized as the other engines do, passed as
token ids: vLLM never re-tokenizes text), one token generated, and the verdict tokens' values read back through
``SamplingParams.logprob_token_ids``; prefix caching is on, so the prefixes of a response share their KV blocks.

- exact recipe: the raw logits of the two verdict tokens (``logprobs_mode="raw_logits"``, greedy), then the same
  float64 ``softmax([l_safe, l_unsafe] / T)`` as the other engines.
- authors' recipe: vLLM's own processors with the authors' settings (repetition penalty 1.2 over the prompt's
  tokens, temperature 0.2, top-k 50, top-p 0.9, in transformers' order) and the processed values of the two tokens
  (``logprobs_mode="processed_logits"``); where both are masked, a second request without top-k/top-p gives the
  fallback (docs/engines.md compares the processors with transformers').

``data_parallel_size`` N > 1: N engines, each in a process of its own on its own devices
(:class:`safeshape.vllm_support.Replicas`); every call's sequences are split into N contiguous shards and the values
come back in their order.
"""
from __future__ import annotations

import math

import torch

from ..errors import SafeshapeError
from ..vllm_support import EngineOwner
from . import recipe as authors

WHAT = "--engine vllm"


class VllmGuard(EngineOwner):
    """A guard folder served by one vLLM engine; ``recipe`` (exact or authors) fixes what the engine returns."""

    def __init__(self, folder: str, recipe: str = "exact", dtype: str = "float32", tensor_parallel_size: int = 1,
                 seed: int = 0, max_model_len: int | None = None, data_parallel_size: int = 1):
        from ..vllm_support import Replicas, check, make_llm, replica_environments

        self.folder = str(folder)
        self.recipe = recipe
        self.seed = seed
        self.requests = 0
        envs = replica_environments(data_parallel_size, tensor_parallel_size)
        self.llm = self.replicas = None
        check(WHAT)  # here, before any replica starts
        if len(envs) > 1:  # one engine per replica process, each as below; the sequences split between them
            self.replicas = Replicas(VllmGuard, dict(folder=self.folder, recipe=recipe, dtype=dtype,
                                                     tensor_parallel_size=tensor_parallel_size, seed=seed,
                                                     max_model_len=max_model_len), envs, WHAT)
        else:
            mode = "processed_logits" if recipe == "authors" else "raw_logits"
            self.llm = make_llm(self.folder, WHAT, dtype=dtype, tensor_parallel_size=tensor_parallel_size,
                                seed=seed, logprobs_mode=mode, max_model_len=max_model_len)

    def _on_replicas(self, method: str, seqs: list[list[int]], *rest) -> list:
        """``method(shard, *rest)`` on each replica, the sequences split into contiguous shards; the answers in the
        sequences' order."""
        from ..vllm_support import split

        shards = [(seqs[lo:hi], *rest) if hi > lo else None for lo, hi in split(len(seqs), len(self.replicas))]
        self.requests += len(seqs)
        return [a for a in self.replicas.call(method, shards) if a is not None]

    def _values(self, seqs: list[list[int]], ids: list[int], params) -> torch.Tensor:
        from vllm.inputs import TokensPrompt

        if not seqs:
            return torch.empty(0, len(ids), dtype=torch.float64)
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in seqs], params, use_tqdm=False)
        self.requests += len(seqs)
        rows = []
        for o in outs:
            step = o.outputs[0].logprobs[0]
            missing = [t for t in ids if t not in step]
            if missing:
                raise SafeshapeError(f"{WHAT}: vLLM returned no value for verdict token(s) {missing}")
            rows.append([float(step[t].logprob) for t in ids])
        return torch.tensor(rows, dtype=torch.float64)

    def verdict_logits(self, seqs: list[list[int]], ids: list[int]) -> torch.Tensor:
        """The guard's next-token logits of ``ids`` after each sequence, [N, len(ids)] float64 (exact recipe)."""
        from vllm import SamplingParams

        if self.recipe != "exact":
            raise SafeshapeError(f"{WHAT}: this engine serves the {self.recipe} recipe, not the exact one")
        if self.replicas is not None and seqs:
            return torch.cat(self._on_replicas("verdict_logits", seqs, ids))
        return self._values(seqs, ids, SamplingParams(max_tokens=1, temperature=0.0, logprob_token_ids=list(ids),
                                                      detokenize=False))

    def authors_pairs(self, seqs: list[list[int]], safe_id: int, unsafe_id: int) -> tuple[torch.Tensor, int]:
        """([N, 2] processed (safe, unsafe) scores under the authors' processors, how many rows had both masked:
        those rows hold the scores before top-k/top-p masking instead, as :func:`recipe.authors_p_safe` does)."""
        from vllm import SamplingParams

        if self.recipe != "authors":
            raise SafeshapeError(f"{WHAT}: this engine serves the {self.recipe} recipe, not the authors' one")
        if self.replicas is not None and seqs:
            answers = self._on_replicas("authors_pairs", seqs, safe_id, unsafe_id)
            return torch.cat([pairs for pairs, _ in answers]), sum(both for _, both in answers)
        common = dict(max_tokens=1, temperature=authors.TEMPERATURE, repetition_penalty=authors.REPETITION_PENALTY,
                      logprob_token_ids=[safe_id, unsafe_id], seed=self.seed, detokenize=False)
        pairs = self._values(seqs, [safe_id, unsafe_id], SamplingParams(top_k=authors.TOP_K, top_p=authors.TOP_P,
                                                                         **common))
        both = [i for i in range(len(seqs)) if all(math.isinf(v) for v in pairs[i].tolist())]
        if both:
            pairs[both] = self._values([seqs[i] for i in both], [safe_id, unsafe_id],
                                       SamplingParams(top_k=0, top_p=1.0, **common))
        return pairs, len(both)
