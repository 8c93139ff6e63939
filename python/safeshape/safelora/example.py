"""Generate a Llama-shaped Safe LoRA example on disk: base and aligned checkpoints + a PEFT LoRA adapter.

The aligned model is the base plus a low-rank "alignment" update (plus a little full-rank noise), so
``V = W_aligned - W_base`` has a real subspace. Half of the adapter's modules put their update inside that
subspace (high cosine), the other half point elsewhere (low cosine), so the selection has something to find.

    python -m safeshape.safelora.example OUT [--hidden 256 --layers 4 ...] [--overwrite]

writes OUT/base, OUT/aligned, OUT/adapter. ``--preset 1b`` gives a 1.1B-parameter Llama shape (bench).
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from tqdm.auto import tqdm

from ..io import atomic_output_dir

PROJECTIONS = {  # name -> (d_out, d_in) as functions of (hidden, intermediate, kv_dim)
    "self_attn.q_proj": lambda h, i, kv: (h, h),
    "self_attn.k_proj": lambda h, i, kv: (kv, h),
    "self_attn.v_proj": lambda h, i, kv: (kv, h),
    "self_attn.o_proj": lambda h, i, kv: (h, h),
    "mlp.gate_proj": lambda h, i, kv: (i, h),
    "mlp.up_proj": lambda h, i, kv: (i, h),
    "mlp.down_proj": lambda h, i, kv: (h, i),
}
PRESETS = {
    "tiny": dict(hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=1024),
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=32000),
}


class _ShardWriter:
    def __init__(self, folder: Path, shard_bytes: int):
        self.folder, self.shard_bytes = folder, shard_bytes
        self.pending, self.size, self.shards, self.weight_map = {}, 0, [], {}

    def add(self, name, t):
        self.pending[name] = t.contiguous()
        self.size += t.numel() * t.element_size()
        if self.size >= self.shard_bytes:
            self.flush()

    def flush(self):
        from safetensors.torch import save_file

        if not self.pending:
            return
        fname = f"model-{len(self.shards) + 1:05d}.safetensors"
        save_file(self.pending, str(self.folder / fname), metadata={"format": "pt"})
        self.shards.append(fname)
        self.weight_map.update({k: fname for k in self.pending})
        self.pending, self.size = {}, 0

    def close(self):
        self.flush()
        if len(self.shards) == 1:
            (self.folder / self.shards[0]).rename(self.folder / "model.safetensors")
            return
        n = len(self.shards)
        renames = {s: f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i, s in enumerate(self.shards)}
        for old, new in renames.items():
            (self.folder / old).rename(self.folder / new)
        index = {"metadata": {}, "weight_map": {k: renames[v] for k, v in sorted(self.weight_map.items())}}
        (self.folder / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))


def make_example(out, *, hidden=256, intermediate=688, layers=4, heads=8, kv_heads=4, vocab=1024, r=8,
                 targets=tuple(PROJECTIONS), dtype=torch.bfloat16, seed=0, shard_bytes=1 << 30,
                 overwrite=False, progress=True) -> Path:
    g = torch.Generator().manual_seed(seed)
    kv = hidden // heads * kv_heads
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": hidden,
              "intermediate_size": intermediate, "num_hidden_layers": layers, "num_attention_heads": heads,
              "num_key_value_heads": kv_heads, "vocab_size": vocab, "max_position_embeddings": 2048,
              "rms_norm_eps": 1e-5, "tie_word_embeddings": False, "torch_dtype": str(dtype).replace("torch.", "")}
    with atomic_output_dir(out, overwrite) as tmp:
        dirs = {k: tmp / k for k in ("base", "aligned", "adapter")}
        for d in dirs.values():
            d.mkdir()
        writers = {k: _ShardWriter(dirs[k], shard_bytes) for k in ("base", "aligned")}
        lora = {}
        names = [("model.embed_tokens.weight", (vocab, hidden))]
        for i in range(layers):
            names += [(f"model.layers.{i}.{p}.weight", f(hidden, intermediate, kv)) for p, f in PROJECTIONS.items()]
            names += [(f"model.layers.{i}.input_layernorm.weight", (hidden,)),
                      (f"model.layers.{i}.post_attention_layernorm.weight", (hidden,))]
        names += [("model.norm.weight", (hidden,)), ("lm_head.weight", (vocab, hidden))]
        for idx, (name, shape) in enumerate(tqdm(names, desc="example weights", unit="tensor", disable=not progress)):
            if len(shape) == 1:
                w = torch.ones(shape)
                writers["base"].add(name, w.to(dtype))
                writers["aligned"].add(name, w.to(dtype))
                continue
            w = torch.randn(shape, generator=g) * 0.02
            d_out, d_in = shape
            k = 4  # rank of the alignment update
            u = torch.randn(d_out, k, generator=g)
            v = torch.randn(k, d_in, generator=g)
            delta = (u @ v) * (0.02 / k**0.5) + torch.randn(shape, generator=g) * 0.001
            writers["base"].add(name, w.to(dtype))
            writers["aligned"].add(name, (w + delta).to(dtype))
            module = name[: -len(".weight")]
            if name.startswith("model.layers.") and module.split(".", 3)[3] in targets:
                a = torch.randn(r, d_in, generator=g) * 0.01
                if idx % 2 == 0:  # inside the alignment subspace (plus a little noise)
                    b = u @ torch.randn(k, r, generator=g) * 0.01 + torch.randn(d_out, r, generator=g) * 1e-4
                else:
                    b = torch.randn(d_out, r, generator=g) * 0.01
                lora[f"base_model.model.{module}.lora_A.weight"] = a.to(dtype)
                lora[f"base_model.model.{module}.lora_B.weight"] = b.to(dtype)
            del w, delta
        for k in ("base", "aligned"):
            writers[k].close()
            (dirs[k] / "config.json").write_text(json.dumps(config, indent=2))
        from safetensors.torch import save_file

        save_file(lora, str(dirs["adapter"] / "adapter_model.safetensors"), metadata={"format": "pt"})
        adapter_config = {
            "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": "aligned", "r": r,
            "lora_alpha": 2 * r, "lora_dropout": 0.0, "target_modules": sorted({t.split(".")[-1] for t in targets}),
            "fan_in_fan_out": False, "bias": "none", "use_rslora": False, "use_dora": False, "rank_pattern": {},
            "alpha_pattern": {}, "modules_to_save": None, "inference_mode": True}
        (dirs["adapter"] / "adapter_config.json").write_text(json.dumps(adapter_config, indent=2))
    return Path(out)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("out")
    ap.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--shard-mb", type=int, default=1024)
    ap.add_argument("--overwrite", action="store_true")
    args = ap.parse_args(argv)
    make_example(args.out, **PRESETS[args.preset], r=args.rank, dtype=getattr(torch, args.dtype), seed=args.seed,
                 shard_bytes=args.shard_mb << 20, overwrite=args.overwrite)
    print(f"wrote {args.out}/base, {args.out}/aligned, {args.out}/adapter")


if __name__ == "__main__":
    main()
