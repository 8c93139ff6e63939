"""Optional: lm-eval-harness tasks (e.g. ``mmlu``) on a loaded model (``pip install lm-eval``; its tasks read their
data sets through the ``datasets`` cache, so download them before running offline).

Tasks of your own: a folder of lm-eval task YAMLs (``--lm-eval-include DIR``, lm-eval's ``--include_path``), whose
``dataset_path: json`` and ``dataset_kwargs: {data_files: ...}`` read local files, needs no hub (docs/engines.md).
"""
from __future__ import annotations

from pathlib import Path

from ..errors import SafeshapeError


def available() -> bool:
    import importlib.util

    return importlib.util.find_spec("lm_eval") is not None


def parse_tasks(text: str | None) -> list[str]:
    tasks = [t.strip() for t in (text or "").split(",") if t.strip()]
    if text is not None and not tasks:
        raise SafeshapeError(f"--lm-eval {text!r}: give task names separated by commas (e.g. mmlu,arc_easy)")
    return tasks


def check_include(paths: list[str] | None, tasks: list[str]) -> list[str]:
    """The task folders of ``--lm-eval-include``, each an existing folder (resolved), and only with ``--lm-eval``."""
    paths = list(paths or [])
    if paths and not tasks:
        raise SafeshapeError("--lm-eval-include adds task folders for --lm-eval: give the task names with --lm-eval")
    out = []
    for p in paths:
        if not Path(p).is_dir():
            raise SafeshapeError(f"--lm-eval-include {p}: not a folder (a folder of lm-eval task YAML files)")
        out.append(str(Path(p).resolve()))
    return out


def require() -> None:
    if not available():
        raise SafeshapeError("--lm-eval needs lm-eval-harness, which is not installed: pip install lm-eval "
                             "(or pip install 'safeshape[harness]')")


def check_tasks(tasks: list[str], include: list[str] | None = None) -> None:
    """Refuse task names lm-eval does not know (its own tasks and those of the ``include`` folders), before any
    generation; a YAML file path is a task too."""
    require()
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=list(include) if include else None)
    known = set(manager.all_tasks)
    unknown = [t for t in tasks if t not in known and not Path(t).is_file() and not manager.match_tasks([t])]
    if unknown:
        where = f" or in --lm-eval-include {', '.join(include)}" if include else \
            " (a task of your own: --lm-eval-include DIR, a folder of its YAML)"
        raise SafeshapeError(f"--lm-eval: unknown task(s) {', '.join(unknown)}: not among lm-eval's tasks{where}")


def run_tasks(model, tokenizer, tasks: list[str], batch_size: int = 8, limit: int | None = None,
              include: list[str] | None = None) -> dict:
    """``{task: {metric: value}}`` (numeric metrics only) from ``lm_eval.simple_evaluate`` on ``model``; ``include``:
    folders of task YAMLs searched before lm-eval's own tasks."""
    require()
    import lm_eval
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    # a PeftModel's base model carries the injected LoRA layers, so it computes with the adapter
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    lm = HFLM(pretrained=base, tokenizer=tokenizer, batch_size=batch_size)
    try:
        manager = TaskManager(include_path=list(include)) if include else None
        out = lm_eval.simple_evaluate(model=lm, tasks=tasks, limit=limit, log_samples=False, task_manager=manager)
    except Exception as exc:  # unknown task names, data sets that are not cached, ...
        raise SafeshapeError(f"--lm-eval {','.join(tasks)}: lm-eval-harness failed: {type(exc).__name__}: {exc}") from None
    return numeric_results(out)


def numeric_results(out: dict | None) -> dict:
    """The numeric metrics of ``simple_evaluate``'s (or the ``lm-eval`` command's results file's) ``results``."""
    return {task: {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
            for task, metrics in (out or {}).get("results", {}).items()}
