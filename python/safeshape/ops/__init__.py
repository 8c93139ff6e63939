"""Typed Python wrappers of ``torch.ops.safeshape.*``, with their fake kernels and autograd formulas.

Each feature's ops live in their own module; everything is re-exported here. Importing this package loads the
native library (after checking it was built for the torch imported).
"""
from .. import _native  # noqa: F401  loads torch.ops.safeshape.* before the fake kernels register
from .projection import alignment_projection_matrix, lora_cosine, project_lora_b
from .star import star_token_weights
from .token_loss import (
    OBJECTIVES,
    full_kl,
    fused_linear_token_logprobs,
    fused_linear_token_loss,
    fused_linear_token_loss_sum,
    token_logprobs,
    token_objective,
)

__all__ = ["project_lora_b", "lora_cosine", "alignment_projection_matrix"]
__all__ += ["star_token_weights"]

__all__ += ["OBJECTIVES", "token_logprobs", "token_objective", "full_kl", "fused_linear_token_logprobs",
            "fused_linear_token_loss", "fused_linear_token_loss_sum"]
