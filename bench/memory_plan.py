"""Memory plan of a DSS LoRA run of `safeshape train` per device, computed from the model config (no download, no
torch): Llama-3-8B and Llama-3-70B by default (their config values are written below), or any Llama-style
config.json given with --config. Plans: bf16 with one full copy per device (DDP), bf16 sharded with --fsdp over
--world devices, QLoRA (--load-in-4bit, NF4 + double quantization, one copy per device), and float32 (the old
default) for contrast. Prints the assumptions, a table in GiB per device, and the same numbers as JSON (--json).

    python bench/memory_plan.py [--config config.json ...] [--world 8] [--seq-len 4096] [--batch-size 1]
        [--lora-r 16] [--target-modules q_proj,v_proj] [--no-gradient-checkpointing] [--device-gib 80] [--json FILE]

The parameter arithmetic is exact and checked against measured tiny runs (tests/test_memory_plan.py, and the
--fsdp run's rank-0 bytes in tests/test_trainer_fsdp.py); activations follow the listed per-layer tensors and are
an estimate (the allocator's slack, the CUDA context and NCCL buffers are not counted).
"""
from __future__ import annotations

import argparse
import json
import math
import sys

GIB = 1024 ** 3
FUSED_CHUNK_BYTES = 128 * 2 ** 20  # the fused loss forms at most 128 MiB of float32 logits per chunk (ops.token_loss)
NF4_BLOCK, NF4_BLOCK2 = 64, 256  # bitsandbytes: absmax per 64 weights, double-quantized in blocks of 256 absmaxes

PRESETS = {  # the published config.json values (meta-llama/Meta-Llama-3-8B, -70B) that the plan reads
    "llama-3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336, num_hidden_layers=32,
                       num_attention_heads=32, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
    "llama-3-70b": dict(vocab_size=128256, hidden_size=8192, intermediate_size=28672, num_hidden_layers=80,
                        num_attention_heads=64, num_key_value_heads=8, head_dim=128, tie_word_embeddings=False),
}
DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}

ASSUMPTIONS = [
    "Llama-style decoder: q/k/v/o projections (grouped KV heads), gate/up/down MLP, two RMSNorms a layer, a final "
    "norm, an untied output head unless tie_word_embeddings; no biases unless attention_bias/mlp_bias",
    "LoRA A [r, in] and B [out, r] on every --target-modules Linear of every layer, float32 (PEFT upcasts them); "
    "trainable state per LoRA weight: the weight, its gradient and two AdamW moments, all float32 (16 bytes)",
    "--fsdp: FSDP2 shards every parameter along dim 0 over --world devices (rank 0 holds ceil(dim0 / world) rows); "
    "each decoder layer is a unit, gathered for its forward and backward (two layers in flight with prefetch); "
    "the root unit (embeddings, final norm, output head) stays gathered from the root's forward to its backward, "
    "which is when the fused loss reads the head's weight",
    "QLoRA: every Linear of the decoder layers in NF4 (half a byte a weight) plus its quantization state (one byte "
    "of absmax per 64 weights, a float32 per 256 absmaxes); embeddings, norms and the output head stay bfloat16",
    "activations in the base dtype (bfloat16; float32 for the float32 plan), micro-batch --batch-size x --seq-len "
    "tokens; per layer, tensors kept for backward: norm outputs, q/k/v, attention output, o_proj input, residual, "
    "gate/up outputs and their product, act(gate): (5H + 2 kv_dim + 4I) values a token (SDPA's flash or "
    "memory-efficient attention keeps no [S, S] matrix)",
    "gradient checkpointing (default on here): each layer's input kept, one layer's activations recomputed at a "
    "time; off: every layer's activations kept",
    "the reference pass (adapter disabled) runs without gradient: one layer's activations at a time, less than the "
    "recompute, so not added",
    "loss: the fused lm-head loss forms one chunk of at most 128 MiB of float32 logits and its gradient, plus the "
    "[N] reference log-probs; never the [N, V] logits",
    "not counted: the CUDA context and allocator slack (add 1-3 GiB), NCCL buffers, the data loader",
]


def param_shapes(cfg: dict) -> list[tuple[str, tuple[int, ...], str]]:
    """``(name, shape, kind)`` of every parameter of the Llama-style model; kind: embed, head, norm, linear (a
    Linear weight inside a decoder layer: what LoRA targets and bitsandbytes quantizes), bias."""
    h, inter, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    hd = cfg.get("head_dim") or h // heads
    out = [("model.embed_tokens.weight", (v, h), "embed")]
    linears = {"q_proj": (heads * hd, h), "k_proj": (kv * hd, h), "v_proj": (kv * hd, h), "o_proj": (h, heads * hd),
               "gate_proj": (inter, h), "up_proj": (inter, h), "down_proj": (h, inter)}
    for i in range(cfg["num_hidden_layers"]):
        for name, shape in linears.items():
            part = "self_attn" if name.endswith(("q_proj", "k_proj", "v_proj", "o_proj")) else "mlp"
            out.append((f"model.layers.{i}.{part}.{name}.weight", shape, "linear"))
            if (part == "self_attn" and cfg.get("attention_bias")) or (part == "mlp" and cfg.get("mlp_bias")):
                out.append((f"model.layers.{i}.{part}.{name}.bias", shape[:1], "bias"))
        out += [(f"model.layers.{i}.input_layernorm.weight", (h,), "norm"),
                (f"model.layers.{i}.post_attention_layernorm.weight", (h,), "norm")]
    out.append(("model.norm.weight", (h,), "norm"))
    if not cfg.get("tie_word_embeddings", False):
        out.append(("lm_head.weight", (v, h), "head"))
    return out


def lora_shapes(cfg: dict, r: int, targets: tuple[str, ...]) -> list[tuple[str, tuple[int, ...]]]:
    """LoRA A ``[r, in]`` and B ``[out, r]`` of every targeted Linear."""
    out = []
    for name, shape, kind in param_shapes(cfg):
        if kind == "linear" and name.split(".")[-2] in targets:
            out += [(name.replace(".weight", ".lora_A.weight"), (r, shape[1])),
                    (name.replace(".weight", ".lora_B.weight"), (shape[0], r))]
    return out


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)


def shard_numel(shape: tuple[int, ...], world: int, rank: int = 0) -> int:
    """Elements of ``rank``'s FSDP2 shard: dim 0 split as torch.chunk (ceil(dim0 / world) rows a rank)."""
    rows = -(-shape[0] // world)
    mine = max(0, min(rows, shape[0] - rank * rows))
    return mine * numel(shape[1:])


def param_bytes(cfg: dict, dtype: str = "bfloat16", world: int = 1, quantize: int | None = None, r: int = 16,
                targets: tuple[str, ...] = ("q_proj", "v_proj"), rank: int = 0) -> dict[str, int]:
    """Bytes of the parameters one process holds (rank ``rank``'s shards when ``world > 1``): ``base`` (frozen; for
    a quantized base the packed weights, as ``parameters()`` reports them), ``quant_state`` (absmax etc., outside
    ``parameters()``) and ``trainable`` (LoRA, float32). ``world > 1`` means --fsdp sharding."""
    def held(shape):
        return shard_numel(shape, world, rank) if world > 1 else numel(shape)

    base = quant_state = 0
    for _, shape, kind in param_shapes(cfg):
        if quantize == 4 and kind == "linear":
            n = numel(shape)
            base += n // 2
            blocks = -(-n // NF4_BLOCK)
            quant_state += blocks + 4 * -(-blocks // NF4_BLOCK2) + 4  # uint8 absmax, float32 absmax2, offset
        elif quantize == 8 and kind == "linear":
            base += numel(shape)
            quant_state += 4 * shape[0]  # float32 scale a row (SCB)
        else:
            base += held(shape) * DTYPE_BYTES[dtype]
    trainable = sum(held(shape) for _, shape in lora_shapes(cfg, r, targets)) * 4
    return {"base": base, "quant_state": quant_state, "trainable": trainable}


def layer_param_bytes(cfg: dict, dtype: str) -> int:
    return sum(numel(s) for n, s, _ in param_shapes(cfg) if n.startswith("model.layers.0.")) * DTYPE_BYTES[dtype]


def root_param_bytes(cfg: dict, dtype: str) -> int:
    return sum(numel(s) for n, s, _ in param_shapes(cfg) if not n.startswith("model.layers.")) * DTYPE_BYTES[dtype]


def activation_bytes(cfg: dict, tokens: int, act_bytes: int, checkpointing: bool) -> int:
    h, inter, layers = cfg["hidden_size"], cfg["intermediate_size"], cfg["num_hidden_layers"]
    heads = cfg["num_attention_heads"]
    kv_dim = (cfg.get("num_key_value_heads") or heads) * (cfg.get("head_dim") or h // heads)
    per_layer = tokens * (5 * h + 2 * kv_dim + 4 * inter) * act_bytes
    if checkpointing:
        return layers * tokens * h * act_bytes + per_layer
    return layers * per_layer


def loss_bytes(cfg: dict, tokens: int) -> int:
    v = cfg["vocab_size"]
    chunk = min(FUSED_CHUNK_BYTES, tokens * v * 4)
    return 2 * chunk + tokens * 4 * 2  # chunk logits + their gradient; reference log-probs and per-token loss


PLANS = (  # (key, title, base dtype, fsdp, quantize)
    ("fp32", "float32, full copy a device (old default)", "float32", False, None),
    ("bf16", "bfloat16, full copy a device (DDP)", "bfloat16", False, None),
    ("bf16_fsdp", "bfloat16, --fsdp over the world", "bfloat16", True, None),
    ("qlora", "QLoRA NF4 (--load-in-4bit), full copy a device", "bfloat16", False, 4),
)


def plan(cfg: dict, world: int, seq_len: int, batch_size: int, r: int, targets: tuple[str, ...],
         checkpointing: bool) -> dict[str, dict[str, int]]:
    """Bytes per device of each plan, by component."""
    tokens = seq_len * batch_size
    out = {}
    for key, _, dtype, fsdp, quantize in PLANS:
        shards = world if fsdp else 1
        p = param_bytes(cfg, dtype, shards, quantize, r, targets)
        row = {"params": p["base"] + p["quant_state"],
               "lora_weights_grads_adam": 4 * p["trainable"],
               "gathered_units": (2 * layer_param_bytes(cfg, dtype) + root_param_bytes(cfg, dtype)) if fsdp else 0,
               "activations": activation_bytes(cfg, tokens, DTYPE_BYTES[dtype], checkpointing),
               "loss": loss_bytes(cfg, tokens)}
        if quantize:  # one Linear dequantized at a time for its matmul (the largest: the MLP's)
            row["dequantized_linear"] = max(numel(s) for _, s, k in param_shapes(cfg) if k == "linear") * 2
        row["total"] = sum(row.values())
        out[key] = row
    return out


def read_config(path: str) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError) as exc:
        raise SystemExit(f"memory_plan: --config {path}: cannot read it ({exc})")
    missing = [k for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                           "num_attention_heads") if k not in cfg]
    if missing:
        raise SystemExit(f"memory_plan: --config {path}: not a Llama-style config (no {', '.join(missing)})")
    return cfg


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--config", action="append", metavar="CONFIG_JSON",
                    help="a Llama-style config.json (repeatable); default: the Llama-3-8B and -70B presets")
    ap.add_argument("--world", type=int, default=8, help="devices that --fsdp shards over (default 8)")
    ap.add_argument("--seq-len", type=int, default=4096)
    ap.add_argument("--batch-size", type=int, default=1, help="rows per micro-batch per device")
    ap.add_argument("--lora-r", type=int, default=16)
    ap.add_argument("--target-modules", default="q_proj,v_proj")
    ap.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=True)
    ap.add_argument("--device-gib", type=float, default=80.0, help="device memory for the fits column (default 80)")
    ap.add_argument("--json", metavar="FILE", help="also write the plan as JSON to FILE")
    args = ap.parse_args(argv)
    targets = tuple(t.strip() for t in args.target_modules.split(",") if t.strip())
    models = ({p: read_config(p) for p in args.config} if args.config else PRESETS)

    print("Assumptions:")
    for a in ASSUMPTIONS:
        print(f"  - {a}")
    print(f"  - run: micro-batch {args.batch_size} x {args.seq_len} tokens, LoRA r={args.lora_r} on "
          f"{','.join(targets)}, gradient checkpointing {'on' if args.gradient_checkpointing else 'off'}, "
          f"--fsdp over {args.world} devices, {args.device_gib:g} GiB a device\n")
    report = {"assumptions": ASSUMPTIONS, "settings": {k: v for k, v in vars(args).items() if k != "json"},
              "models": {}}
    for name, cfg in models.items():
        n_params = sum(numel(s) for _, s, _ in param_shapes(cfg))
        n_lora = sum(numel(s) for _, s in lora_shapes(cfg, args.lora_r, targets))
        plans = plan(cfg, args.world, args.seq_len, args.batch_size, args.lora_r, targets,
                     args.gradient_checkpointing)
        report["models"][name] = {"params": n_params, "lora_params": n_lora, "plans": plans}
        print(f"{name}: {n_params / 1e9:.2f} B parameters, {n_lora / 1e6:.1f} M LoRA parameters  (GiB per device)")
        cols = ("params", "lora_weights_grads_adam", "gathered_units", "dequantized_linear", "activations", "loss",
                "total")
        heads = ("params", "LoRA+Adam", "gathered", "dequant", "activ.", "loss", "total")
        print(f"  {'plan':<48}" + "".join(f"{h:>10}" for h in heads) + "   fits")
        for key, title, *_ in PLANS:
            row = plans[key]
            fits = "yes" if row["total"] / GIB <= args.device_gib else "no"
            print(f"  {title:<48}" + "".join(f"{row.get(c, 0) / GIB:>10.2f}" for c in cols) + f"   {fits}")
        print()
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(report, f, indent=2)
            f.write("\n")
        print(f"JSON: {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
