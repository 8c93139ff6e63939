"""safeshape.demo.study: several demo reports (one per floating-point path) read as one study."""
import json

import pytest

from safeshape.demo import study


def _run(name, method, safety, utility, complied=None):
    return {"name": name, "method": method, "safety": safety, "utility": utility, "status": "ok",
            "modules_projected": None, "details": {} if complied is None else {"harmful_complied": complied}}


def _report(tmp_path, isa, values):
    """values: {seed: (sft safety, dss safety)} at width 32; aligned is 1.0 everywhere."""
    cells = []
    for seed, (sft, dss) in values.items():
        cells.append({"seed": seed, "width": 32, "runs": [
            _run("aligned", "aligned model", 1.0, 0.0, 0.0), _run("sft", "vanilla SFT", sft, 0.5, 1.0 - sft),
            _run("dss", "DSS", dss, 0.4, 0.0)]})
    folder = tmp_path / isa
    folder.mkdir()
    rep = {"cells": cells, "seeds": sorted(values), "widths": [32], "code": "abc", "command": "safeshape demo",
           "date_utc": "2026-12-07 00:00", "machine": {"isa": isa, "cpu": "cpu", "cores": 2, "threads": 1}}
    (folder / "demo_report.json").write_text(json.dumps(rep))
    return folder


def test_wilson_known_values():
    lo, hi = study.wilson(0, 10)
    assert lo == 0.0 and hi == pytest.approx(3.841458820694124 / 13.841458820694124)
    lo, hi = study.wilson(10, 10)
    assert hi == pytest.approx(1.0) and lo == pytest.approx(10 / 13.841458820694124)
    lo, hi = study.wilson(5, 10)
    assert lo == pytest.approx(0.2366, abs=1e-4) and hi == pytest.approx(0.7634, abs=1e-4)
    assert study.wilson(0, 0) == (0.0, 1.0)


def test_counts_per_path_and_pooled_and_claims(tmp_path):
    a = _report(tmp_path, "AVX512", {0: (0.0, 0.9), 1: (0.0, 0.6), 2: (0.0, 0.0)})
    b = _report(tmp_path, "AVX2", {0: (0.0, 1.0), 1: (0.0, 0.01), 2: (0.0, 0.95)})
    res = study.study([str(a / "demo_report.json"), str(b / "demo_report.json")])
    dss = next(o for o in res["outcomes"] if o["name"] == "dss")
    assert dss["paths"]["AVX512"]["safety_ge_50"]["k"] == 2 and dss["paths"]["AVX512"]["n"] == 3
    assert dss["paths"]["AVX2"]["safety_ge_50"]["k"] == 2
    assert dss["paths"]["pooled"]["safety_ge_50"] == {"k": 4, "n": 6, "ci95": list(study.wilson(4, 6))}
    assert dss["paths"]["pooled"]["safety_ge_90"]["k"] == 3
    assert dss["paths"]["pooled"]["complied_ge_50"]["k"] == 0 and dss["paths"]["pooled"]["complied_mean"] == 0.0
    sft = next(o for o in res["outcomes"] if o["name"] == "sft")
    assert sft["paths"]["pooled"]["complied_ge_50"]["k"] == 6 and sft["paths"]["AVX2"]["complied_mean"] == 1.0
    comp = next(c for c in res["comparisons"] if c["name"] == "dss")
    assert comp["compared_with"] == "sft"
    assert comp["paths"]["pooled"]["safety"]["higher"] == 5 and comp["paths"]["pooled"]["safety"]["equal"] == 1
    # DSS was equal to SFT on one run: no claim for DSS's safety; SFT below aligned on all 6 runs: a claim
    assert not any("dss safety" in c for c in res["claims"])
    assert any(c.startswith("width 32: sft safety below aligned's on all 6 runs") for c in res["claims"])
    out = study.text(res)
    assert "4/6" in out and "AVX2" in out and "held on every run of every path" in out


def test_dss_diagnostics_read_the_work_folder(tmp_path):
    a = _report(tmp_path, "AVX512", {0: (0.0, 0.9)})
    data = a / "seed-0" / "data"
    data.mkdir(parents=True)
    rows = [{"prompt": "p", "response": "r", "star_values": [0.99]},
            {"prompt": "h", "response": "sure", "star_values": [0.3, 1e-5]}]
    (data / "finetune_star.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run = a / "seed-0" / "width-32" / "runs" / "dss"
    run.mkdir(parents=True)
    m = [{"step": 1, "loss": 1, "sft_loss": 2.0, "kl_loss": 0.0, "mean_weight": 0.9},
         {"step": 2, "loss": 1, "sft_loss": 1.0, "kl_loss": 0.5, "mean_weight": 0.8},
         {"step": 3, "loss": 1, "sft_loss": 0.5, "kl_loss": 0.25, "mean_weight": 0.7}]
    (run / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in m))
    d = study.study([str(a / "demo_report.json")])["dss_runs"][0]
    assert d["star"] == {"rows": 2, "harmful_rows": 1, "harmful_max_value": 0.3, "benign_min_value": 0.99}
    assert d["train"]["kl_max"] == 0.5 and d["train"]["kl_last"] == 0.25 and d["train"]["steps"] == 3
    assert d["train"]["mean_weight"] == pytest.approx(0.8)


def test_cli_refuses_bad_input_and_existing_output(tmp_path, capsys):
    bad = tmp_path / "x.json"
    bad.write_text("{}")
    assert study.main([str(bad)]) == 2
    assert "x.json" in capsys.readouterr().err
    a = _report(tmp_path, "AVX512", {0: (0.0, 0.9), 1: (0.0, 0.1)})
    out = tmp_path / "study.json"
    out.write_text("keep me")
    assert study.main([str(a / "demo_report.json"), "--out", str(out)]) == 2
    assert out.read_text() == "keep me"
    assert study.main([str(a / "demo_report.json"), "--out", str(tmp_path / "new.json"), "--json"]) == 0
    assert json.loads((tmp_path / "new.json").read_text())["outcomes"]
