"""docs/workflow.md, run as written: a new user's loop (base + aligned + two adapters + their Safe LoRA
projections in one eval table) on the tiny world of safeshape.testing.write_tiny_world."""
from __future__ import annotations

import json
import re
import shlex
from pathlib import Path

from safeshape.cli import main as cli_main

from tests import star_common

DOC = Path(__file__).resolve().parents[1] / "docs" / "workflow.md"

one_thread = __import__("pytest").fixture(autouse=True)(star_common.one_thread)


def doc_commands() -> list[str]:
    """The commands of the page's bash block, continuation lines joined, comments dropped."""
    block = re.search(r"```bash\n(.*?)```", DOC.read_text(), re.S).group(1)
    return [c.strip() for c in block.replace("\\\n", " ").splitlines() if c.strip() and not c.startswith("#")]


def test_the_loop_runs_as_written(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    commands = doc_commands()
    assert [c.split()[0] for c in commands] == ["python", "safeshape", "safeshape", "safeshape"]
    for c in commands:
        argv = shlex.split(c)
        if argv[0] == "python":
            assert argv[1] == "-c"
            exec(argv[2], {})
        else:
            assert cli_main(argv[1:]) == 0, c
    out = capsys.readouterr().out
    report = json.loads((tmp_path / "eval" / "eval_report.json").read_text())
    names = [m["name"] for m in report["models"]]
    assert names == ["base", "aligned", "sft", "sft+safelora", "dss", "dss+safelora"]
    for name in names:
        assert re.search(rf"^{re.escape(name)}\s", out, re.M), name  # a row of the table
    by = {m["name"]: m for m in report["models"]}
    assert by["base"]["adapter"] is None and by["aligned"]["adapter"] is None
    assert Path(by["base"]["model"]).name == "base" and Path(by["dss"]["model"]).name == "aligned"
    for a in ("sft", "dss"):
        totals = by[f"{a}+safelora"]["safelora"]["totals"]
        assert totals["num_modules"] == 4 and totals["num_projected"] == 1  # 0.25 of q_proj, v_proj x 2 layers
        assert by[f"{a}+safelora"]["safelora"]["settings"]["aligned"] == by[a]["model"]
    assert by["aligned"]["safety"]["refusal_rate"] == 1.0  # the aligned stand-in refuses everything
    assert report["settings"]["models"] == [{"name": "base", "path": "base"}, {"name": "aligned", "path": "aligned"}]
    assert report["warnings"] == []
