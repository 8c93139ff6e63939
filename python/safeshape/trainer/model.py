"""The trainer's view of the policy: final hidden states through one module (what DDP/FSDP wrap) and the output
head's weight for the fused loss. Loading and LoRA are :mod:`safeshape.models`, re-exported here for code that
imported them from here."""
from __future__ import annotations

import torch
from torch import Tensor, nn

from ..distributed import is_dtensor
from ..errors import SafeshapeError
from ..models import (apply_lora, body_and_head, check_fused_head, enable_checkpointing,  # noqa: F401
                      hf_model, linear_module_names, load_model, load_tokenizer, quantization_config)


class PolicyHidden(nn.Module):
    """Forward = final hidden states of the (LoRA-wrapped) policy; the module DDP wraps, so gradient sync hooks
    see every trainable parameter while the loss runs outside on the fused ops."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model
        self.body, _ = body_and_head(model)

    def forward(self, input_ids: Tensor, attention_mask: Tensor, reference: bool = False) -> Tensor:
        """``reference``: the adapter-disabled model's, without gradient (through this module's forward, so that a
        sharded root gathers its weights for it as for the policy pass)."""
        if reference:
            return reference_hidden(self.model, input_ids, attention_mask)
        return self.body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state


def head_weight(model: nn.Module) -> Tensor:
    """The output head's weight as the fused loss takes it: a plain ``[V, H]`` tensor. Under ``--fsdp`` the head
    lives in the root unit, which FSDP2 keeps unsharded from the root's forward to its backward; read outside that
    window it is a DTensor shard, which is refused here rather than passed on."""
    weight = hf_model(model).get_output_embeddings().weight
    if is_dtensor(weight):
        raise SafeshapeError(f"lm_head.weight is a sharded DTensor ({weight.placements}) at the loss: read it between "
                             "the FSDP root's forward and its backward")
    return weight


def reference_hidden(model: nn.Module, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
    """Final hidden states of the same model with the LoRA adapter disabled (no second copy of the weights)."""
    body, _ = body_and_head(model)
    peft_model = model
    while hasattr(peft_model, "module") and isinstance(peft_model.module, nn.Module):
        peft_model = peft_model.module
    with torch.no_grad(), peft_model.disable_adapter():
        return body(input_ids=input_ids, attention_mask=attention_mask, use_cache=False).last_hidden_state
