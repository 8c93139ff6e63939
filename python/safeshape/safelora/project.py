"""Safe LoRA over checkpoints: stream base/aligned weights one module at a time, project the selected lora_B."""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from .. import __version__
from ..errors import CheckpointError, SafeshapeError
from ..hub import resolve_folder
from ..io import MANIFEST, apply_umask, atomic_output_dir, check_output_path, write_json
from .adapter import WEIGHTS, Adapter, base_mismatch, copy_adapter_files
from .checkpoint import Checkpoint, check_finite, check_same_architecture
from .projector import check_projector, project
from .selection import select_modules

REPORT_NAME = "safelora_report.json"


@dataclass
class ModuleResult:
    name: str
    r: int
    d_out: int
    d_in: int
    cosine: float
    v_norm: float
    projected: bool = False
    rank_kept: int | None = None  # --projector orthogonal: k, the directions of V kept


def _device(device: str) -> torch.device:
    if device == "auto":  # as `safeshape train --device auto`
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise SafeshapeError(f"--device {device}: CUDA is not available on this machine")
    return dev


def load_weight_pair(base: Checkpoint, aligned: Checkpoint, key: str, d_out: int, d_in: int,
                     fan_in_fan_out: bool, where: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Read ``key`` from both checkpoints as ``[d_out, d_in]`` weights of one supported dtype."""
    for ck in (base, aligned):
        if key not in ck:
            raise CheckpointError(f"{ck.role} checkpoint {ck.folder}: key {key!r} not found (needed by {where})")
    want = (d_in, d_out) if fan_in_fan_out else (d_out, d_in)
    shapes = {ck.role: ck.shape(key) for ck in (base, aligned)}
    if shapes["base"] != shapes["aligned"]:
        raise CheckpointError(f"key {key!r}: shape {list(shapes['base'])} in base {base.folder} but "
                              f"{list(shapes['aligned'])} in aligned {aligned.folder}")
    if len(shapes["base"]) != 2:
        raise CheckpointError(f"key {key!r} in base {base.folder} has shape {list(shapes['base'])}: the target of a "
                              "LoRA must be a 2-D weight")
    if tuple(shapes["base"]) != want:
        raise CheckpointError(f"key {key!r} has shape {list(shapes['base'])} in base {base.folder} but {where} "
                              f"expects {list(want)}" + (" (fan_in_fan_out)" if fan_in_fan_out else ""))
    wb, wa = base.get(key), aligned.get(key)
    check_finite(wb, f"base checkpoint {base.info(key).file}: tensor {key!r}")
    check_finite(wa, f"aligned checkpoint {aligned.info(key).file}: tensor {key!r}")
    if fan_in_fan_out:
        wb, wa = wb.T, wa.T
    if wb.dtype != wa.dtype or wb.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        wb, wa = wb.float(), wa.float()
    return wb, wa


def project_module(w_base, w_aligned, lora_a, lora_b, device, *, projector: str = "paper",
                   energy: float = 0.95, svd: str = "randomized") -> tuple[torch.Tensor, float, float]:
    """``(projected_b on the CPU in lora_b's dtype, cosine, ||V||_F)`` for one module.

    B' is computed and used for the cosine in float32; only the returned tensor is rounded to lora_b's dtype
    (a bf16-rounded B' would move the cosine by ~1e-4). ``projector``: ``paper`` or ``orthogonal``
    (safelora/projector.py).
    """
    projected, cosine, v_norm, _ = _project_one(w_base, w_aligned, lora_a, lora_b, device, projector, energy, svd)
    return projected, cosine, v_norm


def _project_one(w_base, w_aligned, lora_a, lora_b, device, projector, energy, svd="randomized"):
    dev = _device(device) if isinstance(device, str) else device
    projected, cosine, v_norm, k = project(w_aligned.to(dev), w_base.to(dev), lora_a.to(dev),
                                           lora_b.to(dev, torch.float32), projector, energy, svd)
    return projected.to("cpu", lora_b.dtype), cosine, v_norm, k


def _settings(select, num_layers, threshold, device, projector, energy, cosine_decimals, svd, **paths):
    return {"select": select, "num_layers": num_layers if select == "number" else None,
            "threshold": threshold if select == "threshold" else None, "device": str(device),
            "projector": projector, "energy": energy if projector == "orthogonal" else None,
            "svd": svd if projector == "orthogonal" else None,
            "cosine_decimals": cosine_decimals, **{k: str(v) for k, v in paths.items()}}


def check_alignment(results: list[ModuleResult], allow_zero: bool) -> list[str]:
    """Modules with ||V||_F = 0 (base and aligned weights equal) would get lora_B = 0: refused unless allowed."""
    zero = [r.name for r in results if r.v_norm == 0.0]
    if not zero:
        return []
    names = ", ".join(zero[:8]) + (f" and {len(zero) - 8} more" if len(zero) > 8 else "")
    msg = (f"{len(zero)} of {len(results)} modules have base == aligned weights (||V||_F = 0): {names}; "
           "projecting them sets their lora_B to zero")
    if not allow_zero:
        raise SafeshapeError(msg + ". Are --base and --aligned the right checkpoints? Pass --allow-zero-alignment "
                             "(allow_zero_alignment=True) to project anyway")
    return [msg]


def selection_warnings(results: list[ModuleResult], select: str, num_layers) -> list[str]:
    """Warnings for a selection that projects none of the modules (the output is the adapter unchanged) or more than
    half of them (Safe LoRA's selection is meant to pick the few least aligned: with a count made for a large
    model, e.g. --num-layers 10 on a 4-module adapter, it projects them all)."""
    n, k = len(results), sum(r.projected for r in results)
    how = f"--num-layers {num_layers}" if select == "number" else "--threshold"
    if n and k == 0:
        return [f"the selection ({how}) projects none of the {n} modules: the output adapter equals the input"]
    if n and 2 * k > n:
        hint = " (a fraction such as --num-layers 0.1 scales with the adapter)" if select == "number" else ""
        return [f"the selection ({how}) projects {k} of {n} modules, more than half: Safe LoRA is meant to project "
                f"the few least aligned modules{hint}"]
    return []


def build_report(settings: dict, results: list[ModuleResult], cut: float, seconds: float, warnings=()) -> dict:
    n_proj = sum(r.projected for r in results)
    return {
        "safeshape_version": __version__,
        "settings": settings,
        "modules": [asdict(r) for r in results],
        "totals": {"num_modules": len(results), "num_projected": n_proj,
                   "fraction_projected": n_proj / len(results) if results else 0.0,
                   "cosine_cut": cut, "seconds": round(seconds, 3)},
        "warnings": list(warnings),
    }


def _report_path(tmp: Path, out, report) -> Path:
    """Where the report is written before OUT is committed (inside the temporary folder if it belongs to OUT)."""
    if report is None:
        return tmp / REPORT_NAME
    out_r, rep_r = Path(out).resolve(), Path(report).resolve()
    return tmp / rep_r.relative_to(out_r) if out_r in rep_r.parents else Path(report)


def project_adapter(base, aligned, adapter, out, *, select: str = "number", num_layers: int = 10,
                    threshold: float = 0.5, device: str = "cpu", report=None, overwrite: bool = False,
                    progress: bool = True, allow_zero_alignment: bool = False, projector: str = "paper",
                    energy: float = 0.95, cosine_decimals: int | None = None, svd: str = "randomized") -> dict:
    """Safe LoRA on folders: write ``out`` = ``adapter`` with ``lora_B`` projected for the selected modules.

    ``base``/``aligned`` are HF model folders (safetensors, single or sharded), ``adapter`` a PEFT LoRA folder;
    each may be a hub id instead (:func:`safeshape.hub.resolve_folder`).
    The config and every tensor not projected are written byte-identical. ``out`` is written to a temporary
    folder and renamed; an existing ``out`` is refused unless ``overwrite``. The JSON report goes to
    ``report`` (default ``out/safelora_report.json``) and is returned. ``projector``: ``paper`` (the published
    ``C = V V^T / ||V||_F``) or ``orthogonal`` (onto the top singular subspace of V holding ``energy`` of its
    squared norm, found by ``svd``: ``randomized`` (default) or ``exact``, see safelora/projector.py); ``cosine_decimals``: round cosines to that many decimals before selecting (the reference code
    rounds to 5).
    """
    t0 = time.perf_counter()
    aligned_given = str(aligned)
    base, aligned = resolve_folder(base, "--base"), resolve_folder(aligned, "--aligned")
    adapter = resolve_folder(adapter, "--adapter")
    inputs = [("--base", base), ("--aligned", aligned), ("--adapter", adapter)]
    check_output_path(out, overwrite, inputs)
    if report is not None:
        check_output_path(report, overwrite, inputs, what="--report")
    dev = _device(device)
    check_projector(projector, energy, svd)
    select_modules([], select, num_layers, threshold, cosine_decimals)  # validate the settings before any work
    ck_base, ck_aligned = Checkpoint(base, "base"), Checkpoint(aligned, "aligned")
    check_same_architecture(ck_base, ck_aligned)
    ad = Adapter(adapter)

    results, projected = [], {}
    for m in tqdm(ad.modules, desc="safe-lora", unit="module", disable=not progress):
        where = f"{ad.weights_path}: {m.key_b}"
        wb, wa = load_weight_pair(ck_base, ck_aligned, m.weight_key, m.d_out, m.d_in, m.fan_in_fan_out, where)
        projected[m.key_b], cos, vn, k = _project_one(wb, wa, ad.lora_a(m), ad.lora_b(m), dev, projector, energy,
                                                               svd)
        del wb, wa
        results.append(ModuleResult(m.name, m.r, m.d_out, m.d_in, cos, vn, rank_kept=k))
    zero_warnings = check_alignment(results, allow_zero_alignment)
    mask, cut = select_modules([r.cosine for r in results], select, num_layers, threshold, cosine_decimals)
    for r, chosen in zip(results, mask):
        r.projected = chosen
    mismatch = base_mismatch(adapter, aligned, aligned_given, role="--aligned")
    warnings = ad.warnings + zero_warnings + ([mismatch] if mismatch else []) + \
        selection_warnings(results, select, num_layers)

    tensors = dict(ad.tensors)
    for m, r in zip(ad.modules, results):
        if r.projected:
            tensors[m.key_b] = projected[m.key_b].to(ad.lora_b(m).dtype).contiguous()
    settings = _settings(select, num_layers, threshold, dev, projector, energy, cosine_decimals, svd, base=base,
                         aligned=aligned, adapter=adapter, out=out)
    from safetensors.torch import save_file

    with atomic_output_dir(out, overwrite, inputs) as tmp:
        copy_adapter_files(Path(adapter), tmp, skip={WEIGHTS, MANIFEST})  # OUT has its own manifest
        save_file(tensors, str(tmp / WEIGHTS), metadata=ad.metadata or None)
        apply_umask(tmp / WEIGHTS)
        rep = build_report(settings, results, cut, time.perf_counter() - t0, warnings)
        # written before OUT is committed: a --report that cannot be written leaves OUT untouched
        write_json(_report_path(tmp, out, report), rep, overwrite=overwrite or report is None, inputs=inputs,
                   what="--report")
    return rep


def apply_safe_lora(peft_model, base, aligned, *, select: str = "number", num_layers: int = 10,
                    threshold: float = 0.5, device: str | None = None, adapter_name: str | None = None,
                    progress: bool = True, allow_zero_alignment: bool = False, projector: str = "paper",
                    energy: float = 0.95, cosine_decimals: int | None = None, svd: str = "randomized") -> dict:
    """Safe LoRA on a ``peft.PeftModel`` in memory: ``lora_B`` of the selected modules is replaced in place.

    ``base``/``aligned`` are HF model folders or hub ids. Returns the same report as :func:`project_adapter`.
    """
    t0 = time.perf_counter()
    base, aligned = resolve_folder(base, "base"), resolve_folder(aligned, "aligned")
    check_projector(projector, energy, svd)
    select_modules([], select, num_layers, threshold, cosine_decimals)
    ck_base, ck_aligned = Checkpoint(base, "base"), Checkpoint(aligned, "aligned")
    check_same_architecture(ck_base, ck_aligned)
    name = adapter_name or getattr(peft_model, "active_adapter", "default")
    layers = []
    for mod_name, mod in peft_model.named_modules():
        if hasattr(mod, "lora_embedding_A") and name in getattr(mod, "lora_embedding_A", {}):
            raise SafeshapeError(f"module {mod_name}: embedding LoRA is not supported")
        if not (hasattr(mod, "lora_A") and name in mod.lora_A):
            continue
        if getattr(mod, "use_dora", {}).get(name, False):
            raise SafeshapeError(f"module {mod_name}: DoRA is not supported")
        a, b = mod.lora_A[name].weight, mod.lora_B[name].weight
        for part, t in (("lora_A", a), ("lora_B", b)):
            check_finite(t.detach(), f"module {mod_name}: {part}[{name!r}].weight")
        if a.dim() != 2:
            raise SafeshapeError(f"module {mod_name}: lora_A has shape {list(a.shape)}; only Linear LoRA is supported")
        clean = mod_name[len("base_model.model."):] if mod_name.startswith("base_model.model.") else mod_name
        layers.append((clean, mod, a, b, bool(getattr(mod, "fan_in_fan_out", False))))
    if not layers:
        raise SafeshapeError(f"the model has no LoRA layers for adapter {name!r}")
    results, projected = [], []
    for clean, mod, a, b, fifo in tqdm(layers, desc="safe-lora", unit="module", disable=not progress):
        wb, wa = load_weight_pair(ck_base, ck_aligned, f"{clean}.weight", b.shape[0], a.shape[1], fifo,
                                  f"LoRA module {clean}")
        dev = device or b.device
        p, cos, vn, k = _project_one(wb, wa, a.detach(), b.detach(), dev, projector, energy, svd)
        projected.append(p)
        results.append(ModuleResult(clean, a.shape[0], b.shape[0], a.shape[1], cos, vn, rank_kept=k))
    zero_warnings = check_alignment(results, allow_zero_alignment)
    mask, cut = select_modules([r.cosine for r in results], select, num_layers, threshold, cosine_decimals)
    with torch.no_grad():
        for (clean, mod, a, b, _), r, p, chosen in zip(layers, results, projected, mask):
            r.projected = chosen
            if chosen:
                b.copy_(p.to(device=b.device, dtype=b.dtype))
    settings = _settings(select, num_layers, threshold, device or "model", projector, energy, cosine_decimals, svd,
                         base=base, aligned=aligned, adapter=f"<PeftModel:{name}>")
    return build_report(settings, results, cut, time.perf_counter() - t0,
                        zero_warnings + selection_warnings(results, select, num_layers))
