"""The demo end to end: make the models, run every method, score them, write the report; for several seeds and
model widths.

Layout of the work folder (every artifact under a fixed name; a stage whose artifact exists is skipped, so a rerun,
a run after an interruption, or a run with more seeds or widths only does what is missing; artifacts are written
to a temporary sibling and renamed, so a crash never leaves a half-written one that a rerun would trust)::

    demo_settings.json            the training profile (another profile is refused without --overwrite)
    demo_report.json, demo_plot.png   the aggregate over the seeds and widths of the last run
    seed-S/                       what every width of seed S shares: the world's data, the guard, STAR, RS flags
      width-W/                    the policy at width W: base, aligned, runs/<method>/, scores/, cell_report.json
"""
from __future__ import annotations

import importlib.util
import json
import platform
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

from ..errors import SafeshapeError
from ..io import atomic_output_file, refuse_link
from .datasets import DataStages
from .runs import RunStages, number_k, read_safelora_report, safelora_names  # noqa: F401 -- number_k: re-exported
from .scoring import ScoringStages
from .settings import (DSS_KL_COEF, FORMAT, HEADS, PROFILES, RS_THRESHOLD, SAFELORA_ENERGY,  # noqa: F401
                       SAFELORA_THRESHOLD, STAR_CHUNK_WORDS, Profile, Run, parse_int_list, tiny_profile,
                       write_json_file)
from .training import ModelStages
from .world import REFUSAL, World


def machine() -> dict:
    """What the numbers were measured on: they are deterministic on one machine, not across SIMD paths."""
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {"cpu": cpu, "isa": torch.backends.cpu.get_cpu_capability(), "cores": __import__("os").cpu_count(),
            "threads": torch.get_num_threads(), "torch": torch.__version__, "python": platform.python_version(),
            "platform": platform.platform()}


def code_version() -> str | None:
    """The git commit the package was run from (with "+changes" when the package's files differ from it), or None
    outside git. Read when a run starts: a commit made while it runs is not the code that ran."""
    import subprocess

    package = Path(__file__).resolve().parent.parent
    try:
        commit = subprocess.run(["git", "-C", str(package), "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "-C", str(package), "status", "--porcelain", "--untracked-files=no", "--",
                                "."], capture_output=True, text=True, timeout=10, check=True).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return commit + ("+changes" if dirty else "")


class Demo(ModelStages, DataStages, RunStages, ScoringStages):
    """The demo over ``seeds`` x ``widths``: ``Demo(workdir, seeds=(0, 1, 2)).run()`` returns the report."""

    def __init__(self, workdir, fast: bool = False, seeds=(0,), widths=None, progress: bool = True,
                 overwrite: bool = False, log=print, profile: Profile | None = None, jobs: int = 1):
        self.dir = Path(workdir)
        if not isinstance(jobs, int) or jobs < 1:
            raise SafeshapeError(f"--jobs {jobs}: must be a positive integer")
        self.jobs = jobs
        self.profile = profile or PROFILES["fast" if fast else "full"]
        self.seeds = tuple(seeds)
        self.widths = tuple(widths or (self.profile.hidden,))
        if not self.seeds or not self.widths:
            raise SafeshapeError("--seeds/--widths: name at least one")
        for w in self.widths:
            if w < HEADS or w % HEADS:
                raise SafeshapeError(f"--widths: {w} is not a multiple of the {HEADS} attention heads")
        # bars only where someone watches them: a redirected run would fill its log with carriage returns
        self.progress = progress and sys.stderr.isatty()
        self.log = log
        self.timings: dict[str, float] = {}
        self.skipped: list[str] = []
        self._resolved: set[str] = set()  # stages already done or found in this run
        self._worlds: dict[int, World] = {}
        settings = {"profile": asdict(self.profile), "format": FORMAT}
        settings_path = self.dir / "demo_settings.json"
        refuse_link(self.dir, "--workdir")  # its stages are written (and --overwrite deletes) inside it
        if self.dir.exists() and not self.dir.is_dir():
            raise SafeshapeError(f"--workdir {self.dir}: exists and is not a folder")
        if self.dir.is_dir() and any(self.dir.iterdir()) and not settings_path.exists():
            raise SafeshapeError(f"--workdir {self.dir}: a non-empty folder that is not a demo work folder (it has no "
                                 "demo_settings.json); choose a new or empty folder")
        if settings_path.exists():
            old = json.loads(settings_path.read_text())
            if old != json.loads(json.dumps(settings)):
                if not overwrite:
                    raise SafeshapeError(
                        f"{settings_path}: this work folder holds a demo made with other settings "
                        f"(profile {old.get('profile', {}).get('name')!r}, format {old.get('format', 1)}); use "
                        "another --workdir, or --overwrite to delete it and start again")
                shutil.rmtree(self.dir)
        self.dir.mkdir(parents=True, exist_ok=True)
        write_json_file(settings_path, settings)

    # ---- folders and the world ---------------------------------------------------------------------------------
    def world(self, seed: int) -> World:
        if seed not in self._worlds:
            self._worlds[seed] = World(seed)
        return self._worlds[seed]

    def seed_dir(self, seed: int) -> Path:
        return self.dir / f"seed-{seed}"

    def cell_dir(self, seed: int, width: int) -> Path:
        return self.seed_dir(seed) / f"width-{width}"

    # ---- stages -----------------------------------------------------------------------------------------------
    def _stage(self, name: str, artifact: Path, make) -> Path:
        if name in self._resolved:
            return artifact
        if artifact.exists():
            self._resolved.add(name)
            self.skipped.append(name)
            self.log(f"[demo] {name}: cached ({artifact})")
            return artifact
        self.log(f"[demo] {name} ...")
        t = time.perf_counter()
        artifact.parent.mkdir(parents=True, exist_ok=True)
        make(artifact)
        self._resolved.add(name)
        self.timings[name] = round(time.perf_counter() - t, 2)
        self.log(f"[demo] {name}: done in {self.timings[name]:.1f}s")
        return artifact

    def _torch_setup(self) -> int:
        import torch

        threads = torch.get_num_threads()
        # These models are tiny: one thread is fastest, and with more, OpenMP workers spin against each other on
        # a busy 2-core machine (measured here: 70 ms a step on 1 thread, 3.6 s on 2 under load).
        torch.set_num_threads(1)
        return threads

    # ---- everything -------------------------------------------------------------------------------------------
    def run(self) -> dict:
        """Every stage not yet in the work folder, for every seed and width; then ``demo_report.json`` (the cells
        and their aggregate) and ``demo_plot.png``."""
        import torch
        from transformers.utils import logging as hf_logging

        threads = self._torch_setup()
        hf_bars = hf_logging.is_progress_bar_enabled()
        hf_logging.disable_progress_bar()  # loading/saving these tiny models is instant: their bars are noise
        try:
            return self._run()
        finally:
            torch.set_num_threads(threads)
            if hf_bars:
                hf_logging.enable_progress_bar()

    def _run(self) -> dict:
        from .report import aggregate, plot

        t0, code = time.perf_counter(), code_version()
        grid = [(seed, width) for seed in self.seeds for width in self.widths]
        if self.jobs == 1 or len(grid) == 1:
            cells = [self.run_cell(seed, width) for seed, width in grid]
        else:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            # spawned, not forked: a fork after OpenMP has run can hang
            with ProcessPoolExecutor(min(self.jobs, len(grid)),
                                     mp_context=multiprocessing.get_context("spawn")) as pool:
                # what a seed's widths share first, then the cells: no two processes ever make the same artifact
                self._in_processes(pool, self.prepare_seed, [(seed,) for seed in self.seeds])
                # the widest (slowest) cells first, so that the last to start are the quick ones
                order = sorted(grid, key=lambda cell: -cell[1])
                done = dict(zip(order, self._in_processes(pool, self.run_cell, order)))
                cells = [done[cell] for cell in grid]
        # a stage another process of this run made first is this run's work, not the cache's
        self.skipped = [name for name in dict.fromkeys(self.skipped) if name not in self.timings]
        report = {
            "format": FORMAT,
            "command": self.command(),
            "seeds": list(self.seeds),
            "widths": list(self.widths),
            "profile": asdict(self.profile),
            "machine": machine(),
            "code": code,
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime()),
            "defaults": {"safelora_threshold": SAFELORA_THRESHOLD, "safelora_k": "round(10/64 * modules), >= 1",
                         "safelora_energy_orthogonal": SAFELORA_ENERGY, "dss_kl_coef": DSS_KL_COEF,
                         "star_chunk_words": STAR_CHUNK_WORDS, "rs_threshold": RS_THRESHOLD},
            "world": cells[0]["world"],
            "cells": cells,
            "timings_s": self.timings,
            "cached_stages": self.skipped,
            "wall_s": round(time.perf_counter() - t0, 2),
        }
        report.update(aggregate(report))
        report = json.loads(json.dumps(report))  # what the file holds (tuples become lists)
        if importlib.util.find_spec("matplotlib") is None:  # optional: the table and the JSON report say everything
            self.log("[demo] matplotlib is not installed: no plot (pip install matplotlib)")
            report["plot"] = None
        else:
            with atomic_output_file(self.dir / "demo_plot.png", overwrite=True) as tmp:
                plot(report, tmp)
            report["plot"] = "demo_plot.png"
        write_json_file(self.dir / "demo_report.json", report)
        return report

    def command(self) -> str:
        fast = " --fast" if self.profile.name == "fast" else ""
        widths = "" if self.widths == (self.profile.hidden,) else " --widths " + ",".join(map(str, self.widths))
        return f"safeshape demo{fast} --seeds {','.join(map(str, self.seeds))}{widths}"

    def _in_processes(self, pool, method, arg_list: list[tuple]) -> list:
        """``method(*args)`` for every entry, in the worker processes of ``pool`` (one torch thread each); their
        stage timings join this run's and their logs follow as each finishes."""
        settings = {"workdir": str(self.dir), "profile": asdict(self.profile), "seeds": self.seeds,
                    "widths": self.widths}
        futures = [pool.submit(_worker, settings, method.__name__, args) for args in arg_list]
        self.log(f"[demo] {method.__name__} for {', '.join(map(str, arg_list))}: in {self.jobs} processes "
                 "(their logs follow as each finishes)")
        results = []
        for fut in futures:
            value, timings, skipped, logs = fut.result()
            self.timings.update(timings)
            self.skipped += skipped
            for line in logs:
                self.log(line)
            results.append(value)
        return results

    def prepare_seed(self, seed: int) -> None:
        """What every width of a seed shares: the guard, the fine-tuning data, its STAR values and RS flags."""
        self.make_finetune_data(seed)
        self.make_rs_data(seed)  # makes the guard and the STAR values first
        self.score_guard(seed)

    def run_cell(self, seed: int, width: int) -> dict:
        """Every method at one seed and one width; the cell's report (also written to its folder)."""
        self.prepare_seed(seed)
        base, aligned = self.make_base(seed, width), self.make_aligned(seed, width)
        data = self.make_finetune_data(seed)
        runs = [Run("base", "base model (before alignment)", str(base)),
                Run("aligned", "aligned model (before fine-tuning)", str(aligned))]

        def add(run: Run, adapter: Path) -> Run:
            run.adapter = str(adapter)
            runs.append(run)
            return run

        sft = add(Run("sft", "vanilla SFT (LoRA)", str(aligned)), self.train_run(seed, width, "sft", "sft", data))
        add(Run("rs", "RS: rejection sampling by the guard (rejected rows dropped)", str(aligned)),
            self.train_run(seed, width, "rs", "rs", self.make_rs_data(seed)))
        add(Run("deep-token", "Deep Token (Qi et al. betas)", str(aligned)),
            self.train_run(seed, width, "deep-token", "deep-token", data))
        dss = add(Run("dss", f"DSS (STAR, lambda={DSS_KL_COEF}, M={STAR_CHUNK_WORDS})", str(aligned)),
                  self.train_run(seed, width, "dss", "dss", self.make_star_data(seed)))
        for parent, label in ((sft, "SFT"), (dss, "DSS")):
            for projector in ("paper", "orthogonal"):
                for select in ("number", "threshold"):
                    name, desc = safelora_names(parent.name, label, projector, select)
                    run = add(Run(name, desc, str(aligned)),
                              self.safelora_run(seed, width, name, Path(parent.adapter), select, projector))
                    read_safelora_report(run)
        for run in runs:
            self.score(seed, width, run)
        world = self.world(seed)
        cell = {
            "seed": seed, "width": width,
            "world": {"refusal": REFUSAL, "eval_harmful": len(world.eval_harmful),
                      "eval_benign": len(world.eval_benign),
                      "safety": "refusal rate on held-out harmful requests (greedy decoding)",
                      "utility": "exact-match accuracy on held-out benign task requests (greedy decoding)"},
            "runs": [asdict(r) for r in runs],
            "guard": self.score_guard(seed),
            "alignment_spectrum": self.alignment_spectrum(seed, width),
        }
        cell = json.loads(json.dumps(cell))
        write_json_file(self.cell_dir(seed, width) / "cell_report.json", cell)
        return cell


def _worker(settings: dict, method: str, args: tuple):
    """One piece of a ``--jobs`` run in a worker process: its return value, stage timings, cached stages, log."""
    from transformers.utils import logging as hf_logging

    logs: list[str] = []
    demo = Demo(settings["workdir"], seeds=settings["seeds"], widths=settings["widths"], progress=False,
                log=logs.append, profile=Profile(**{**settings["profile"],
                                                    "target_modules": tuple(settings["profile"]["target_modules"])}))
    demo._torch_setup()
    hf_logging.disable_progress_bar()
    return getattr(demo, method)(*args), demo.timings, demo.skipped, logs
