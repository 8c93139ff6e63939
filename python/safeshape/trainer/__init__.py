"""LoRA fine-tuning with the SFT, RS and DSS losses: ``safeshape.trainer.train(TrainConfig(...))`` or
``safeshape train``. The loop is :mod:`safeshape.trainer.loop`; checkpoints :mod:`safeshape.trainer.checkpoint`."""
from .config import TrainConfig
from .loop import train

__all__ = ["TrainConfig", "train"]
