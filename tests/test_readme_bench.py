"""docs/benchmarks.md's projection table is rendered from committed bench JSON (bench/readme_table.py), not by hand."""
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "bench"))
import readme_table  # noqa: E402


def test_readme_table_matches_committed_results():
    run = subprocess.run([sys.executable, str(ROOT / "bench" / "readme_table.py"), "--check"], capture_output=True,
                         text=True)
    assert run.returncode == 0, run.stderr
    assert list(readme_table.RESULTS.glob("projection_*.json")), "no committed bench results"


def test_render_reads_the_numbers_from_the_json(tmp_path):
    row = dict(d_out=4096, d_in=4096, r=16, dtype="float32", cpu_isa="avx2", threads=1, ours_over_floor=4.5678,
               ours_over_compute=1.234, reference_over_ours=55.4, machine="Test CPU, 2 CPUs",
               date="2026-01-01 00:00 UTC")
    (tmp_path / "projection_avx2_t1.json").write_text(json.dumps([row]))
    table = readme_table.render(readme_table.load_runs(tmp_path))
    assert "| avx2 | 1 | - | 4.57x, 1.23x fma |" in table
    assert "Test CPU, 2 CPUs" in table and "| 55-55x |" in table


def test_check_fails_when_the_page_differs(tmp_path, monkeypatch):
    page = tmp_path / "benchmarks.md"
    page.write_text(f"intro\n{readme_table.BEGIN}\nhand-edited 3.1x\n{readme_table.END}\n")
    monkeypatch.setattr(readme_table, "PAGE", page)
    assert readme_table.main(["--check"]) == 1
    assert readme_table.main(["--write"]) == 0
    assert readme_table.main(["--check"]) == 0
    assert "hand-edited" not in page.read_text() and page.read_text().startswith("intro\n")
