"""The demo's results: a text table and a PNG plot from ``demo_report.json``."""
from __future__ import annotations

import os
from pathlib import Path


def _pct(x) -> str:
    return "n/a" if x is None else f"{100 * x:5.1f}%"


def table(report: dict) -> str:
    """Method, safety, utility, modules projected; runs that could not run say why."""
    rows = [("method", "safety", "utility", "projected")]
    notes = []
    for r in report["runs"]:
        rows.append((r["method"], _pct(r["safety"]), _pct(r["utility"]), r["modules_projected"] or "-"))
        if r["status"] != "ok":
            notes.append(f"  {r['name']}: {r['status']}")
    widths = [max(len(row[i]) for row in rows) for i in range(4)]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths)))
             for row in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    w = report["world"]
    lines += ["", f"safety  = {w['safety']} ({w['eval_harmful']} requests)",
              f"utility = {w['utility']} ({w['eval_benign']} requests)"]
    g = report.get("guard")
    if g:
        lines.append(f"guard   = flags {_pct(g['unsafe_flagged']).strip()} of held-out harmful compliance, passes "
                     f"{_pct(g['safe_passed']).strip()} of refusals and task answers")
    spec = report.get("alignment_spectrum")
    if spec:
        def span(key, fmt):
            vals = [m[key] for m in spec]
            return f"{min(vals):{fmt}}-{max(vals):{fmt}}"

        lines += [f"V = W_aligned - W_base in the {len(spec)} LoRA target modules: ||V||_F {span('v_norm', '.2f')}, "
                  f"95% of ||V||^2 in {span('rank_95', 'd')} of {spec[0]['shape'][0]} directions;",
                  f"  Safe LoRA's C = VV^T/||V||_F has largest eigenvalue {span('c_max_eigenvalue', '.2f')} "
                  "(the most a projected module keeps of its update)"]
    if notes:
        lines += ["", "not run:"] + notes
    return "\n".join(lines)


def plot(report: dict, path: str | os.PathLike) -> None:
    """Grouped bars of safety and utility per method, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    runs = [r for r in report["runs"] if r["status"] == "ok"]
    names = [r["name"] for r in runs]
    x = range(len(runs))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.1 * len(runs)), 3.8))
    ax.bar([i - 0.2 for i in x], [100 * r["safety"] for r in runs], 0.4, label="safety (refusal rate, harmful)")
    ax.bar([i + 0.2 for i in x], [100 * r["utility"] for r in runs], 0.4, label="utility (task accuracy, benign)")
    ax.set_xticks(list(x), names, rotation=30, ha="right")
    ax.set_ylim(0, 125)  # room for the legend above the 100% bars
    ax.set_yticks(range(0, 101, 20))
    ax.set_ylabel("%")
    ax.set_title(f"safeshape demo ({report['profile']['name']}, seed {report['seed']})")
    ax.legend(loc="upper center", ncol=2, frameon=False)
    fig.tight_layout()
    path = Path(path)
    tmp = path.with_name(path.stem + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)
