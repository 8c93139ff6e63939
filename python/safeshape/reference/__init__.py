"""Plain-torch references of every native op: slow, obvious, and what the tests compare against."""
from .projection import alignment_projection_matrix, lora_cosine, project_lora_b
from .star import star_token_weights
from .token_loss import (
    deep_token_betas,
    full_kl,
    fused_linear_token_logprobs,
    fused_linear_token_loss,
    token_logprobs,
    token_objective,
)

__all__ = ["project_lora_b", "lora_cosine", "alignment_projection_matrix"]
__all__ += ["star_token_weights"]

__all__ += ["token_logprobs", "token_objective", "deep_token_betas", "full_kl", "fused_linear_token_logprobs",
            "fused_linear_token_loss"]
