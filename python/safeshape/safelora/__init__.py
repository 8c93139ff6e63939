"""Safe LoRA (Hsu et al., NeurIPS 2024) over checkpoints and PEFT models; the math is docs/math.md#safe-lora."""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {
    "Adapter": ".adapter", "LoraModule": ".adapter", "Checkpoint": ".checkpoint", "apply_safe_lora": ".project",
    "project_adapter": ".project", "project_module": ".project", "select_modules": ".selection",
})

__all__ = ["project_adapter", "apply_safe_lora", "project_module", "select_modules", "Adapter", "LoraModule",
           "Checkpoint"]
