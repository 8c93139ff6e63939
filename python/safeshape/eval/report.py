"""The eval report as a text table and a PNG plot (safety vs utility per model)."""
from __future__ import annotations

import io
import os


def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.1f}%"


def table(report: dict) -> str:
    """One row per model: harmful rate (guard), mean P(unsafe), refusal rate (keywords), utility, prompts/s."""
    rows = [("model", "harmful", "P(unsafe)", "refusal", "utility", "prompts/s")]
    for m in report["models"]:
        s, u, g = m["safety"], m.get("utility"), m["generation"]
        mean = "-" if s["mean_p_unsafe"] is None else f"{s['mean_p_unsafe']:.3f}"
        pps = "-" if g.get("prompts_per_s") is None else f"{g['prompts_per_s']:.2f}"
        rows.append((m["name"], _pct(s["harmful_rate"]), mean, _pct(s["refusal_rate"]),
                     _pct(u["accuracy"]) if u else "-", pps))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))) for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    st = report["settings"]
    lines.append("")
    lines.append(f"harmful = guard P(unsafe) > 0.5 on {report['models'][0]['safety']['n']} harmful prompts"
                 + (f" ({st['guard']}, preset {st['preset']})" if st.get("guard") else " (no --guard: not judged)"))
    lines.append("refusal = response contains a refusal phrase (safeshape.eval.REFUSAL_KEYWORDS)")
    lines.append(f"engine = {st.get('engine', 'hf')}")
    if report["models"][0].get("utility"):
        lines.append(f"utility = {'/'.join(report['models'][0]['utility']['metrics'])} match on "
                     f"{report['models'][0]['utility']['n']} task prompts")
    cats = report["models"][0]["safety"]["per_category"]
    if cats:
        lines += ["", "per category (harmful / refusal):"]
        for c in cats:
            cells = [f"{m['name']} {_pct(m['safety']['per_category'][c]['harmful_rate'])}"
                     f"/{_pct(m['safety']['per_category'][c]['refusal_rate'])}" for m in report["models"]]
            lines.append(f"  {c}: " + ", ".join(cells))
    for m in report["models"]:
        for task, metrics in (m.get("lm_eval") or {}).items():
            lines.append(f"lm-eval {m['name']} {task}: " + ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
    return "\n".join(lines)


def safety_value(model: dict) -> tuple[float | None, str]:
    """Safety for the plot: 1 - harmful rate when a guard judged, else the refusal rate."""
    s = model["safety"]
    if s["harmful_rate"] is not None:
        return 1.0 - s["harmful_rate"], "safety (1 - harmful rate, guard)"
    return s["refusal_rate"], "safety (refusal rate, keywords)"


def plot_png(report: dict) -> bytes:
    """Safety against utility, one point per model (bars of safety when there is no utility)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = report["models"]
    fig, ax = plt.subplots(figsize=(6.0, 4.2))
    label = safety_value(models[0])[1]
    if all(m.get("utility") for m in models):
        seen: dict[tuple[float, float], int] = {}
        for m in models:
            x, y = 100 * m["utility"]["accuracy"], 100 * safety_value(m)[0]
            k = seen[(x, y)] = seen.get((x, y), -1) + 1  # stack the names of models that share a point
            ax.scatter([x], [y], s=40)
            ax.annotate(m["name"], (x, y), textcoords="offset points", xytext=(5, 4 + 10 * k), fontsize=8)
        ax.set_xlabel("utility (% correct)")
        ax.set_xlim(-5, 105)
    else:
        ax.bar(range(len(models)), [100 * safety_value(m)[0] for m in models])
        ax.set_xticks(range(len(models)), [m["name"] for m in models], rotation=30, ha="right")
    ax.set_ylabel(label + " %")
    ax.set_ylim(-5, 105)
    ax.set_title("safeshape eval")
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    return buf.getvalue()


def write_plot(report: dict, path: str | os.PathLike) -> bool:
    """Write the plot atomically; False when matplotlib is not installed."""
    from ..io import atomic_write_bytes

    try:
        data = plot_png(report)
    except ImportError:
        return False
    atomic_write_bytes(path, data, overwrite=True)
    return True
