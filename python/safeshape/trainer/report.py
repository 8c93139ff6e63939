"""``--report-to``: the metrics of every logged step also go to TensorBoard or Weights & Biases (rank 0 only).

metrics.jsonl stays the record; a reporter is a copy for the dashboards people already use. Keys starting with
``eval_`` go under ``eval/``, the rest under ``train/``."""
from __future__ import annotations

import os
from dataclasses import asdict

from ..errors import SafeshapeError

REPORTERS = ("none", "tensorboard", "wandb")
TENSORBOARD_DIR = "runs"  # under --out, as transformers.Trainer's default logging_dir


def _scalars(metrics: dict) -> dict[str, float]:
    return {(f"eval/{k[5:]}" if k.startswith("eval_") else f"train/{k}"): float(v) for k, v in metrics.items()
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}


class NoReporter:
    def log(self, metrics: dict, step: int) -> None:
        pass

    def close(self) -> None:
        pass


class TensorBoardReporter(NoReporter):
    def __init__(self, out: str):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise SafeshapeError("--report-to tensorboard: the tensorboard package is not installed "
                                 "(pip install tensorboard)") from None
        self.writer = SummaryWriter(log_dir=os.path.join(out, TENSORBOARD_DIR))

    def log(self, metrics: dict, step: int) -> None:
        for key, value in _scalars(metrics).items():
            self.writer.add_scalar(key, value, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class WandbReporter(NoReporter):
    """A wandb run in ``out`` (project from WANDB_PROJECT, default safeshape; WANDB_MODE=offline works offline)."""

    def __init__(self, out: str, config):
        try:
            import wandb
        except ImportError:
            raise SafeshapeError("--report-to wandb: the wandb package is not installed (pip install wandb)") from None
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "safeshape"), dir=out,
                              config=asdict(config), reinit="finish_previous")

    def log(self, metrics: dict, step: int) -> None:
        self.run.log(_scalars(metrics), step=step)

    def close(self) -> None:
        self.run.finish()


def open_reporter(kind: str, out: str, config) -> NoReporter:
    if kind == "tensorboard":
        return TensorBoardReporter(out)
    if kind == "wandb":
        return WandbReporter(out, config)
    return NoReporter()
