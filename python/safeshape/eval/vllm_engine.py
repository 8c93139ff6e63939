"""``safeshape eval --engine vllm``: the base model and every adapter served by one vLLM engine (adapters as LoRA
requests), prompts rendered and tokenized as the hf engine does (:func:`.generate.render_prompt`) and passed as
token ids, responses cut and decoded as :func:`.generate.generate_batch` does, so greedy float32 responses match.

``--batch-size`` prompts are submitted per call (vLLM batches them continuously inside) and saved after each call,
so a run resumes as the hf engine's does. ``--data-parallel-size N``: N engines, each in a process of its own on its
own devices (:class:`safeshape.vllm_support.Replicas`); each call's prompts are split into N contiguous shards and
the responses come back in the prompts' order, saved by this process as with one engine.
"""
from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from types import SimpleNamespace

from ..errors import SafeshapeError
from ..vllm_support import EngineOwner
from .generate import Generation, GenerationSettings, check_policy_tokenizer, render_prompt, stop_ids

WHAT = "--engine vllm"


def adapter_rank(folder: str) -> int:
    """The LoRA rank ``r`` of a PEFT adapter folder (vLLM sizes its LoRA slots by the largest)."""
    path = Path(folder) / "adapter_config.json"
    try:
        r = json.loads(path.read_text()).get("r", 8)
    except (OSError, json.JSONDecodeError) as exc:
        raise SafeshapeError(f"--adapter {folder}: cannot read {path}: {exc}") from None
    return int(r)


class VllmPolicy(EngineOwner):
    """One engine for ``model`` and LoRA requests for ``adapters`` (folders), ids in the order given."""

    def __init__(self, model: str, adapters: Sequence[str], dtype: str = "float32", tensor_parallel_size: int = 1,
                 seed: int = 0, data_parallel_size: int = 1):
        from transformers import GenerationConfig

        from ..vllm_support import Replicas, check, make_llm, replica_environments

        self.model = str(model)
        self.adapters = {str(Path(a).resolve()): i + 1 for i, a in enumerate(dict.fromkeys(adapters))}
        ranks = [adapter_rank(a) for a in self.adapters]
        max_rank = next((r for r in (8, 16, 32, 64, 128, 256, 320, 512) if r >= max(ranks)), max(ranks)) \
            if ranks else 16
        try:
            gen_cfg = GenerationConfig.from_pretrained(self.model, local_files_only=True)
        except Exception:  # no generation_config.json: the tokenizer's EOS only
            gen_cfg = None
        self.generation_config = gen_cfg
        envs = replica_environments(data_parallel_size, tensor_parallel_size)
        self.llm = self.replicas = None
        check(WHAT)  # here, before any replica starts
        if len(envs) > 1:  # one engine per replica process, each as below; the prompts split between them
            self.replicas = Replicas(VllmPolicy, dict(model=self.model, adapters=list(self.adapters), dtype=dtype,
                                                      tensor_parallel_size=tensor_parallel_size, seed=seed),
                                     envs, WHAT)
        else:
            self.llm = make_llm(self.model, WHAT, dtype=dtype, tensor_parallel_size=tensor_parallel_size, seed=seed,
                                enable_lora=bool(ranks), max_lora_rank=max_rank, max_loras=max(1, len(ranks)))

    def lora_request(self, adapter: str | None):
        if adapter is None:
            return None
        from vllm.lora.request import LoRARequest

        key = str(Path(adapter).resolve())
        if key not in self.adapters:
            raise SafeshapeError(f"--adapter {adapter}: not one of the adapters this engine was started with")
        return LoRARequest(f"adapter-{self.adapters[key]}", self.adapters[key], key)

    def token_rows(self, ids: list[list[int]], settings: GenerationSettings, seeds: list[int], adapter: str | None,
                   eos: list[int]) -> list[list[int]]:
        """The generated ids of each prompt (one call: each prompt a request, greedy or sampled with its own seed);
        with several replicas, contiguous shards of the prompts on each, the rows back in the prompts' order."""
        if self.replicas is not None:
            from ..vllm_support import split

            shards = [(ids[lo:hi], settings, seeds[lo:hi], adapter, eos) if hi > lo else None
                      for lo, hi in split(len(ids), len(self.replicas))]
            return [row for rows in self.replicas.call("token_rows", shards) if rows is not None for row in rows]
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        sample = settings.temperature > 0
        params = [SamplingParams(max_tokens=settings.max_new_tokens, stop_token_ids=eos, detokenize=False,
                                 temperature=settings.temperature if sample else 0.0,
                                 top_p=settings.top_p if sample else 1.0, seed=s if sample else None)
                  for s in seeds]
        outs = self.llm.generate([TokensPrompt(prompt_token_ids=list(s)) for s in ids], params, use_tqdm=False,
                                 lora_request=self.lora_request(adapter))
        return [list(o.outputs[0].token_ids) for o in outs]

    def generate_ids(self, tokenizer, ids: list[list[int]], settings: GenerationSettings, seeds: list[int],
                     adapter: str | None = None) -> list[Generation]:
        """One call (:meth:`token_rows`); each response cut at the first stop id and decoded as the hf engine
        does."""
        eos = stop_ids(SimpleNamespace(generation_config=self.generation_config), tokenizer)
        results = []
        for row in self.token_rows(ids, settings, seeds, adapter, eos):
            stop = next((i for i, t in enumerate(row) if t in eos), None)
            toks = row if stop is None else row[:stop]
            text = tokenizer.decode(toks, skip_special_tokens=True).strip()
            results.append(Generation(text, len(toks) + (stop is not None), stop is not None))
        return results


def generate_responses(policy: VllmPolicy, tokenizer, prompts: Sequence[str],
                       settings: GenerationSettings | None = None, progress: bool = False, desc: str = "generate",
                       dist=None, skip: Sequence[bool] | None = None,
                       on_batch: Callable[[list[int], list[Generation]], None] | None = None,
                       adapter: str | None = None) -> list[Generation | None]:
    """:func:`.generate.generate_responses` through ``policy`` (``adapter``: one of its LoRA folders, or None for the
    base model); ``settings.batch_size`` prompts per engine call, ``on_batch`` after each; ``dist`` must be one
    process (vLLM shares its own work)."""
    from tqdm.auto import tqdm

    if dist is not None and dist.enabled and dist.world_size > 1:
        from ..vllm_support import TORCHRUN

        raise SafeshapeError(TORCHRUN)
    settings = settings or GenerationSettings()
    check_policy_tokenizer(tokenizer, getattr(tokenizer, "name_or_path", "tokenizer"))
    ids = [render_prompt(tokenizer, p) for p in prompts]
    todo = [i for i in range(len(ids)) if not (skip is not None and skip[i])]
    out: list[Generation | None] = [None] * len(ids)
    bar = tqdm(total=len(todo), desc=desc, unit="prompt", disable=not progress, dynamic_ncols=True, leave=False)
    start, new_tokens = time.perf_counter(), 0
    try:
        for b0 in range(0, len(todo), settings.batch_size):
            idx = todo[b0:b0 + settings.batch_size]
            gens = policy.generate_ids(tokenizer, [ids[i] for i in idx], settings,
                                       [settings.seed + i for i in idx], adapter)
            for i, g in zip(idx, gens):
                out[i] = g
            new_tokens += sum(g.new_tokens for g in gens)
            bar.update(len(idx))
            bar.set_postfix(tok_s=f"{new_tokens / max(time.perf_counter() - start, 1e-9):.0f}")
            if on_batch is not None:
                on_batch(idx, gens)
    finally:
        bar.close()
    return out


def load_policy(cfg, model_dir: str, adapters: list[str]) -> tuple[VllmPolicy, object]:
    """(engine, tokenizer) for ``safeshape eval``'s config ``cfg``: the model folder ``model_dir`` with its LoRA
    ``adapters`` (checked against the model's shapes by eval's early validation, :func:`.validate.check_models`)."""
    from ..models import load_tokenizer

    tokenizer = load_tokenizer(model_dir, check=check_policy_tokenizer, model_folder=True)
    return VllmPolicy(model_dir, adapters, dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                      seed=cfg.seed, data_parallel_size=cfg.data_parallel_size), tokenizer


def load_guard(cfg):
    """(VllmGuard, tokenizer) for ``safeshape eval``'s judge (the exact recipe)."""
    from ..star.guard import load_guard_tokenizer
    from ..star.vllm_engine import VllmGuard

    tokenizer = load_guard_tokenizer(cfg.guard, "--guard")
    return VllmGuard(cfg.guard, recipe="exact", dtype=cfg.dtype, tensor_parallel_size=cfg.tensor_parallel_size,
                     seed=cfg.seed, data_parallel_size=cfg.data_parallel_size), tokenizer
