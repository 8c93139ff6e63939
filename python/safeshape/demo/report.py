"""The demo's results from ``demo_report.json``: the aggregate over seeds and widths, a text table, the results
block of docs/demo.md, and a PNG plot."""
from __future__ import annotations

import os

PARENT = {"rs": "sft", "deep-token": "sft", "dss": "sft", "sft": "aligned"}  # what a method is compared with


def _stats(values: list) -> dict:
    """mean/min/max over the seeds where a value exists; ``values`` keeps every seed's (None: not run)."""
    have = [v for v in values if v is not None]
    if not have:
        return {"mean": None, "min": None, "max": None, "n": 0, "values": values}
    return {"mean": sum(have) / len(have), "min": min(have), "max": max(have), "n": len(have), "values": values}


def _parent(name: str) -> str | None:
    if "+safelora" in name:
        return name.split("+", 1)[0]
    return PARENT.get(name)


def aggregate(report: dict) -> dict:
    """``summary``: per width, per method, safety and utility over seeds (mean, min, max, every value) and each
    seed's projected modules; ``comparisons``: per method, on how many seeds it is above/equal/below the method it
    is compared with; ``width_sweep``: per width, V's spread relative to the width, C's largest eigenvalue,
    the adapters' cosines and Safe LoRA's effect (change from its parent, per seed)."""
    summary, comparisons, sweep = [], [], []
    for width in report["widths"]:
        cells = [c for c in report["cells"] if c["width"] == width]
        seeds = [c["seed"] for c in cells]
        names = [r["name"] for r in cells[0]["runs"]]
        by_name = {n: [next(r for r in c["runs"] if r["name"] == n) for c in cells] for n in names}
        rows = []
        for n in names:
            rs = by_name[n]
            rows.append({"name": n, "method": rs[0]["method"], "status": [r["status"] for r in rs],
                         "safety": _stats([r["safety"] for r in rs]), "utility": _stats([r["utility"] for r in rs]),
                         "modules_projected": [r["modules_projected"] for r in rs]})
        summary.append({"width": width, "seeds": seeds, "runs": rows})
        for n in names:
            ref = _parent(n)
            if ref not in by_name:
                continue
            entry = {"width": width, "name": n, "compared_with": ref}
            for key in ("safety", "utility"):
                diffs = [None if a[key] is None or b[key] is None else a[key] - b[key]
                         for a, b in zip(by_name[n], by_name[ref])]
                have = [d for d in diffs if d is not None]
                entry[key] = {"higher": sum(d > 1e-12 for d in have), "equal": sum(abs(d) <= 1e-12 for d in have),
                              "lower": sum(d < -1e-12 for d in have), "n": len(have), "diff": _stats(diffs)}
            comparisons.append(entry)
        spectra = [m for c in cells for m in c["alignment_spectrum"]]
        point = {"width": width, "seeds": seeds,
                 "rank_95": _stats([m["rank_95"] for m in spectra]),
                 "rank_95_of_width": _stats([m["rank_95"] / m["shape"][0] for m in spectra]),
                 "c_max_eigenvalue": _stats([m["c_max_eigenvalue"] for m in spectra]),
                 "v_norm": _stats([m["v_norm"] for m in spectra]), "cosines": {}}
        for n in names:
            mods = [m for r in by_name[n] for m in r["details"].get("safelora", {}).get("modules", [])]
            if mods and n.endswith("-number"):  # the cosines do not depend on the selection mode
                point["cosines"][n[:-len("-number")]] = _stats([m["cosine"] for m in mods])
        sweep.append(point)
    return {"summary": summary, "comparisons": comparisons, "width_sweep": sweep}


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def _stat(s: dict) -> str:
    if s["mean"] is None:
        return "n/a"
    if s["n"] == 1:
        return _pct(s["mean"])
    return f"{_pct(s['mean'])} [{100 * s['min']:.1f}-{100 * s['max']:.1f}]"


def _span(s: dict, fmt: str) -> str:
    return "n/a" if s["mean"] is None else f"{s['mean']:{fmt}} [{s['min']:{fmt}}-{s['max']:{fmt}}]"


def _columns(rows: list[tuple[str, ...]]) -> list[str]:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return lines


def table(report: dict) -> str:
    """Per width: method, safety and utility (mean [min-max] over seeds), modules projected on each seed; then the
    width sweep, the comparisons seed by seed, and the runs that could not run with the reason."""
    seeds = ",".join(map(str, report["seeds"]))
    lines = [f"{len(report['seeds'])} seed(s) ({seeds}); mean [min-max] over seeds"]
    notes: dict[tuple[str, str], list[int]] = {}  # (run, why) -> widths
    for block in report["summary"]:
        lines += ["", f"width {block['width']}"]
        rows = [("method", "safety", "utility", "projected")]
        for r in block["runs"]:
            rows.append((r["method"], _stat(r["safety"]), _stat(r["utility"]),
                         " ".join(p or "-" for p in r["modules_projected"]) if any(r["modules_projected"]) else "-"))
            for s in sorted(set(st for st in r["status"] if st != "ok")):
                notes.setdefault((r["name"], s), []).append(block["width"])
        lines += _columns(rows)
    w = report["world"]
    lines += ["", f"safety  = {w['safety']} ({w['eval_harmful']} requests)",
              f"utility = {w['utility']} ({w['eval_benign']} requests)"]
    guards = [c["guard"] for c in report["cells"]]
    if guards:
        lines.append(f"guard   = flags {min(g['unsafe_flagged'] for g in guards):.1%} or more of held-out harmful "
                     f"compliance, passes {min(g['safe_passed'] for g in guards):.1%} or more of refusals and task "
                     "answers (worst seed)")
    lines += ["", "orthogonal P = U_k U_k^T, the k singular directions of V holding "
                  f"{report['defaults']['safelora_energy_orthogonal']:.0%} of ||V||^2 (the paper's is C = VV^T/||V||_F)",
              "", "width sweep: V = W_aligned - W_base in the LoRA target modules (every seed and module), "
                  "C = VV^T/||V||_F, adapters' cosines <C dW, dW>/(|C dW| |dW|)"]
    rows = [("width", "95% of ||V||^2 in", "of width", "C largest eigenvalue", "||V||_F")]
    cos_names = sorted({k for p in report["width_sweep"] for k in p["cosines"]})
    rows[0] += tuple(f"cos {k}" for k in cos_names)
    for p in report["width_sweep"]:
        rows.append((str(p["width"]), _span(p["rank_95"], ".1f"), _span(p["rank_95_of_width"], ".2f"),
                     _span(p["c_max_eigenvalue"], ".2f"), _span(p["v_norm"], ".2f"))
                    + tuple(_span(p["cosines"][k], ".2f") if k in p["cosines"] else "n/a" for k in cos_names))
    lines += _columns(rows)
    lines += ["", "seed by seed: safety / utility of each method against the one it is compared with "
                  "(+ higher, = equal, - lower; on how many seeds)"]
    rows = [("width", "method", "vs", "safety +/=/-", "utility +/=/-", "mean change (points)")]
    for c in report["comparisons"]:
        s, u = c["safety"], c["utility"]
        if not s["n"]:
            continue
        rows.append((str(c["width"]), c["name"], c["compared_with"], f"{s['higher']}/{s['equal']}/{s['lower']}",
                     f"{u['higher']}/{u['equal']}/{u['lower']}",
                     f"{100 * s['diff']['mean']:+.1f} / {100 * u['diff']['mean']:+.1f}"))
    lines += ["  " + line for line in _columns(rows)]
    lines += ["", "held on every seed:"] + [f"  {c}" for c in every_seed_claims(report)]
    if notes:
        lines += ["", "not run:"] + [f"  {name} (width {', '.join(map(str, ws))}): {why}"
                                     for (name, why), ws in notes.items()]
    return "\n".join(lines)


def every_seed_claims(report: dict) -> list[str]:
    """The comparisons that went the same way on every seed (at least two), in words; the rest are mixed."""
    out = []
    for c in report["comparisons"]:
        for key in ("safety", "utility"):
            k = c[key]
            if k["n"] < 2:
                continue
            for way, word in (("higher", "above"), ("equal", "equal to"), ("lower", "below")):
                if k[way] == k["n"]:
                    out.append(f"width {c['width']}: {c['name']} {key} {word} {c['compared_with']}'s "
                               f"({k['n']} of {k['n']} seeds)")
    return out or ["(nothing: every comparison was mixed, or there was one seed)"]


def readme_block(report: dict) -> str:
    """docs/demo.md's results block: how they were made (command, machine, ISA, threads, seeds) and the table."""
    m = report["machine"]
    head = (f"`{report['command']}`, {report['date_utc']} UTC, {m['cpu']} ({m['cores']} cores), ISA {m['isa']}, "
            f"{m['threads']} torch thread(s), torch {m['torch']}, code {report.get('code') or 'unknown'}: "
            f"{report['wall_s'] / 60:.1f} min for the stages not "
            f"cached ({len(report['cached_stages'])} stages were). Seeds {', '.join(map(str, report['seeds']))}; "
            f"widths {', '.join(map(str, report['widths']))}. Generated by `safeshape demo --table-from "
            "DIR/demo_report.json`.")
    return f"{head}\n\n```\n{table(report)}\n```\n"


def plot(report: dict, path: str | os.PathLike) -> None:
    """Per width, grouped bars of mean safety and utility per method, the seeds' min-max as error bars and the
    mean printed on each bar (a 0% bar shows "0")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    blocks = report["summary"]
    n_runs = max(len(b["runs"]) for b in blocks)
    fig, axes = plt.subplots(len(blocks), 1, figsize=(max(7.0, 1.0 * n_runs), 3.9 * len(blocks)), squeeze=False)
    for ax, block in zip(axes[:, 0], blocks):
        runs = [r for r in block["runs"] if r["safety"]["mean"] is not None]
        x = range(len(runs))
        for offset, key, label in ((-0.2, "safety", "safety (refusal rate, harmful)"),
                                   (0.2, "utility", "utility (task accuracy, benign)")):
            means = [100 * r[key]["mean"] for r in runs]
            err = [[m - 100 * r[key]["min"] for m, r in zip(means, runs)],
                   [100 * r[key]["max"] - m for m, r in zip(means, runs)]]
            xs = [i + offset for i in x]
            bars = ax.bar(xs, means, 0.4, label=label, yerr=err if len(block["seeds"]) > 1 else None,
                          capsize=3, error_kw={"elinewidth": 1})
            for xi, m, top in zip(xs, means, [m + e for m, e in zip(means, err[1])]):
                ax.text(xi, max(top, m) + 1.5, f"{m:.0f}", ha="center", va="bottom", fontsize=7,
                        color=bars.patches[0].get_facecolor())
        ax.set_xticks(list(x), [r["name"] for r in runs], rotation=30, ha="right", fontsize=8)
        ax.set_ylim(0, 130)  # room for the labels and the legend above the 100% bars
        ax.set_yticks(range(0, 101, 20))
        ax.set_ylabel("%")
        seeds = ",".join(map(str, block["seeds"]))
        spread = ", bars = mean, lines = min-max over seeds" if len(block["seeds"]) > 1 else ""
        ax.set_title(f"safeshape demo ({report['profile']['name']}, width {block['width']}, seeds {seeds}{spread})",
                     fontsize=9)
        ax.legend(loc="upper center", ncol=2, frameon=False, fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
