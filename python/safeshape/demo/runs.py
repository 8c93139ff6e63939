"""The methods' runs, each a cached stage of a seed and width: LoRA fine-tuning of the aligned model through
``safeshape.trainer`` (SFT, RS, Deep Token, DSS) and Safe LoRA on a run's adapter through ``safeshape.safelora``
(the paper's projector or the orthogonal one, k by number or by threshold)."""
from __future__ import annotations

import json
from pathlib import Path

from ..io import atomic_output_dir
from .settings import DSS_KL_COEF, SAFELORA_ENERGY, SAFELORA_K_PER_64, SAFELORA_THRESHOLD, Run


def count_lora_modules(adapter: Path) -> int:
    """How many modules a PEFT adapter adapts (its lora_A tensors)."""
    from safetensors import safe_open

    with safe_open(str(Path(adapter) / "adapter_model.safetensors"), "pt") as f:
        return sum(1 for k in f.keys() if ".lora_A." in k)


def number_k(adapter: Path) -> int:
    """Safe LoRA's k = 10 of Llama-2-7B's 64 q/v modules, scaled to this adapter's module count, at least 1."""
    return max(1, round(SAFELORA_K_PER_64 / 64 * count_lora_modules(adapter)))


def safelora_names(parent: str, label: str, projector: str, select: str) -> tuple[str, str]:
    """Run name and table label of Safe LoRA on ``parent`` with ``projector`` (paper | orthogonal) and ``select``."""
    name = f"{parent}+safelora-{select}" if projector == "paper" else f"{parent}+safelora-{projector}-{select}"
    how = "number, k scaled from 10/64" if select == "number" else f"threshold {SAFELORA_THRESHOLD}"
    proj = "" if projector == "paper" else f", {projector} P"
    return name, f"{label} + Safe LoRA ({how}{proj})"


MODULE_FIELDS = ("name", "cosine", "projected", "v_norm", "rank_kept")  # of safelora_report.json, kept per module


def read_safelora_report(run: Run) -> None:
    rep = json.loads((Path(run.adapter) / "safelora_report.json").read_text())
    totals = rep["totals"]
    run.modules_projected = f"{totals['num_projected']}/{totals['num_modules']}"
    run.details["safelora"] = {"settings": rep["settings"], "totals": totals,
                               "modules": [{key: m[key] for key in MODULE_FIELDS if key in m} for m in rep["modules"]]}


class RunStages:
    """Mixed into :class:`.pipeline.Demo` (which gives ``_stage``, the folders and the models)."""

    def train_run(self, seed: int, width: int, name: str, loss: str, data: Path) -> Path:
        """LoRA fine-tuning of the aligned model through ``safeshape.trainer``."""
        aligned = self.make_aligned(seed, width)

        def make(path: Path):
            from safeshape.trainer import TrainConfig, train

            p = self.profile
            with atomic_output_dir(path) as tmp:
                train(TrainConfig(model=str(aligned), data=str(data), out=str(tmp), loss=loss,
                                  kl_coef=DSS_KL_COEF, lora_r=p.lora_r, lora_alpha=p.lora_alpha,
                                  target_modules=p.target_modules, epochs=p.finetune_epochs, lr=p.finetune_lr,
                                  batch_size=p.finetune_batch_size, seed=seed, device="cpu",
                                  progress=self.progress))

        return self._stage(f"seed {seed} width {width}: LoRA fine-tuning: {name}",
                           self.cell_dir(seed, width) / "runs" / name, make)

    def safelora_run(self, seed: int, width: int, name: str, adapter: Path, select: str, projector: str) -> Path:
        base, aligned = self.make_base(seed, width), self.make_aligned(seed, width)
        extra = {}
        if projector != "paper":
            # the exact SVD: cheap at these widths, and the README's committed numbers were made with it
            extra = {"projector": projector, "energy": SAFELORA_ENERGY, "svd": "exact"}

        def make(path: Path):
            from safeshape.safelora import project_adapter

            project_adapter(base=str(base), aligned=str(aligned), adapter=str(adapter), out=str(path), select=select,
                            num_layers=number_k(adapter), threshold=SAFELORA_THRESHOLD, progress=self.progress,
                            **extra)

        return self._stage(f"seed {seed} width {width}: Safe LoRA ({projector}, {select}): {name}",
                           self.cell_dir(seed, width) / "runs" / name, make)
