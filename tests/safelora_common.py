"""A tiny base/aligned Llama pair on disk and a PEFT LoRA model on the aligned one (tests of apply_safe_lora)."""
import pytest
import torch


def make_peft_setup(tmp_path, layers=2, vocab=128, v_rank=2):
    """Save base and aligned (= base + a rank-`v_rank` change in every projection) under tmp_path, return the
    PeftModel (r = 4 on q_proj and v_proj, random lora_B) after saving it to tmp_path/adapter."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(hidden_size=64, intermediate_size=96, num_hidden_layers=layers,
                                   num_attention_heads=4, num_key_value_heads=2, vocab_size=vocab)
    base = transformers.LlamaForCausalLM(cfg)
    base.save_pretrained(tmp_path / "base")
    aligned = transformers.LlamaForCausalLM(cfg)
    aligned.load_state_dict(base.state_dict())
    with torch.no_grad():
        for n, p in aligned.named_parameters():
            if "proj" in n:
                p.add_(0.01 * torch.randn(p.shape[0], v_rank) @ torch.randn(v_rank, p.shape[1]))
    aligned.save_pretrained(tmp_path / "aligned")
    model = peft.get_peft_model(aligned, peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"]))
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "lora_B" in n:
                p.normal_(0, 0.01)
    model.save_pretrained(tmp_path / "adapter")
    return model
