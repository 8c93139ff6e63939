"""`safeshape project`'s warnings (in the report and on stderr): an adapter recorded on another base than --aligned,
a selection of none or more than half of the modules; --num-layers as a count or a fraction."""
from __future__ import annotations

import json

import pytest

from safeshape.cli import main as cli_main
from safeshape.errors import SafeshapeError
from safeshape.safelora.project import ModuleResult, selection_warnings
from safeshape.safelora.selection import parse_num_layers, select_modules

from tests.safelora_common import make_peft_setup


def test_num_layers_count_or_fraction():
    cos = [0.1, 0.5, 0.3, 0.9, 0.7, 0.2, 0.8, 0.4]
    assert select_modules(cos, "number", 3)[0] == [c <= 0.3 for c in cos]
    assert select_modules(cos, "number", 0.25)[0] == [c <= 0.2 for c in cos]  # ceil(0.25 * 8) = 2
    assert select_modules(cos, "number", 0.3)[0] == [c <= 0.3 for c in cos]  # ceil(2.4) = 3
    assert select_modules(cos, "number", 0.01)[0] == [c <= 0.1 for c in cos]  # at least one
    assert parse_num_layers("10") == 10 and parse_num_layers("0.25") == 0.25 and parse_num_layers("3.0") == 3
    for bad in ("0", "1.5", "-1", "x", "1.0e9x", "nan"):
        with pytest.raises(SafeshapeError, match="--num-layers must be a positive integer .* or a fraction"):
            select_modules(cos, "number", parse_num_layers(bad))
    with pytest.raises(SafeshapeError, match="--num-layers"):
        select_modules(cos, "number", True)


def _results(projected):
    return [ModuleResult(f"m{i}", 4, 8, 8, 0.5, 1.0, projected=p) for i, p in enumerate(projected)]


def test_selection_warnings():
    assert selection_warnings(_results([True, False, False, False]), "number", 1) == []
    assert selection_warnings(_results([True, True, False, False]), "number", 2) == []  # half: not more
    (w,) = selection_warnings(_results([True, True, True, False]), "number", 10)
    assert "projects 3 of 4 modules, more than half" in w and "--num-layers 10" in w and "fraction" in w
    (w,) = selection_warnings(_results([False] * 4), "threshold", 10)
    assert "projects none of the 4 modules" in w and "--threshold" in w


def test_project_warns_in_report_and_stderr(tmp_path, capsys):
    make_peft_setup(tmp_path)  # 2 layers x (q_proj, v_proj) = 4 modules
    cfg_path = tmp_path / "adapter" / "adapter_config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["base_model_name_or_path"] = str(tmp_path / "base")  # trained from the unaligned base, as a user might
    cfg_path.write_text(json.dumps(cfg))
    args = ["project", "--base", str(tmp_path / "base"), "--aligned", str(tmp_path / "aligned"), "--adapter",
            str(tmp_path / "adapter"), "--no-progress"]
    assert cli_main(args + ["--out", str(tmp_path / "o1")]) == 0  # default --num-layers 10 on 4 modules
    err = capsys.readouterr().err
    report = json.loads((tmp_path / "o1" / "safelora_report.json").read_text())
    assert len(report["warnings"]) == 2
    recorded, most = report["warnings"]
    assert "records base_model_name_or_path" in recorded and f"--aligned {tmp_path / 'aligned'}" in recorded
    assert "projects 4 of 4 modules, more than half" in most
    assert all(f"warning: {w}" in err for w in report["warnings"])
    cfg["base_model_name_or_path"] = str(tmp_path / "aligned")
    cfg_path.write_text(json.dumps(cfg))
    assert cli_main(args + ["--out", str(tmp_path / "o2"), "--num-layers", "0.25"]) == 0
    report = json.loads((tmp_path / "o2" / "safelora_report.json").read_text())
    assert report["warnings"] == [] and report["totals"]["num_projected"] == 1
    assert report["settings"]["num_layers"] == 0.25
    assert "warning" not in capsys.readouterr().err
