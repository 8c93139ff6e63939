"""LoRA fine-tuning with the SFT, RS and DSS losses: ``safeshape.trainer.train(TrainConfig(...))`` or
``safeshape train``. The loop is :mod:`safeshape.trainer.loop`; checkpoints :mod:`safeshape.trainer.checkpoint`."""
from .._lazy import lazy_exports

__getattr__, __dir__ = lazy_exports(__name__, {"TrainConfig": ".config", "train": ".loop"})

__all__ = ["TrainConfig", "train"]
