"""Safe LoRA (Hsu et al., NeurIPS 2024) over checkpoints and PEFT models; the math is SPEC.md section 1."""
from .adapter import Adapter, LoraModule
from .checkpoint import Checkpoint
from .project import apply_safe_lora, project_adapter, project_module
from .selection import select_modules

__all__ = ["project_adapter", "apply_safe_lora", "project_module", "select_modules", "Adapter", "LoraModule",
           "Checkpoint"]
