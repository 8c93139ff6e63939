"""docs/math.md stays in sync with the code: every `docs/math.md#<anchor>` cited in the sources exists, every section
is cited by a test, nothing cites the old spec file, and its table of defaults matches the code's defaults."""
import dataclasses
import importlib
import inspect
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
MATH = ROOT / "docs" / "math.md"
CITED_IN = ["python/safeshape", "tests", "cpp", "cuda", "include", "bench", "examples", "README.md", "DESIGN.md",
            "docs"]
BUILD_COPIES = ["python/safeshape/include", "python/safeshape/share"]  # copied in by the build
SUFFIXES = {".py", ".cpp", ".h", ".cu", ".cuh", ".md", ".txt"}
CITE = re.compile(r"docs/math\.md#([A-Za-z0-9_-]+)")
# sections no test cites yet, with the reason; remove an entry once a test cites the section
UNTESTED = {
    "notation": "definitions only",
    "defaults": "checked by test_defaults_table_matches_the_code",
}


def slug(heading: str) -> str:
    """GitHub's anchor of a heading: lower case, punctuation other than '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors() -> list[str]:
    return [slug(m.group(1)) for m in re.finditer(r"^#{2,4} (.+)$", MATH.read_text(), flags=re.M)]


def source_files():
    for entry in CITED_IN:
        path = ROOT / entry
        files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.suffix in SUFFIXES)
        yield from (f for f in files if f.is_file() and f != MATH  # the page names its own citation form
                    and not any(f.is_relative_to(ROOT / c) for c in BUILD_COPIES))


def citations() -> dict[str, set[str]]:
    """anchor -> files (relative) that cite it."""
    cited: dict[str, set[str]] = {}
    for f in source_files():
        for anchor in CITE.findall(f.read_text(errors="replace")):
            cited.setdefault(anchor, set()).add(str(f.relative_to(ROOT)))
    return cited


def test_anchors_are_unique():
    found = anchors()
    assert len(found) == len(set(found)), f"duplicate headings in docs/math.md: {found}"


def test_every_cited_anchor_exists():
    known = set(anchors())
    missing = {a: sorted(files) for a, files in citations().items() if a not in known}
    assert not missing, f"cited anchors that docs/math.md does not have: {missing}"


def test_every_section_is_cited_by_a_test():
    tested = {a for a, files in citations().items() if any(f.startswith("tests/") and f != "tests/test_docs_math.py"
                                                             for f in files)}
    uncited = [a for a in anchors() if a not in tested and a not in UNTESTED]
    assert not uncited, f"docs/math.md sections no test cites (cite them in the test that checks them): {uncited}"
    stale = [a for a in UNTESTED if a in tested or a not in anchors()]
    assert not stale, f"UNTESTED entries to remove: {stale}"


def test_nothing_cites_spec_md():
    spec = "SPEC" + ".md"  # split so this file does not match itself
    offenders = [str(f.relative_to(ROOT)) for f in source_files() if spec in f.read_text(errors="replace")]
    assert not offenders, f"cite docs/math.md instead of {spec} (not in the repository): {offenders}"


def _defaults_table() -> list[tuple[str, str, str]]:
    text = MATH.read_text().split("## Defaults", 1)[1]
    rows = [[c.strip().strip("`") for c in line.strip().strip("|").split("|")] for line in text.splitlines()
            if line.startswith("|")]
    return [(sym, default, where) for sym, _, default, where in rows[2:]]  # skip the header and its rule


def _code_default(where: str):
    module, attr = where.split(":")
    owner_name, param = attr.rsplit(".", 1)
    owner = getattr(importlib.import_module(module), owner_name)
    if dataclasses.is_dataclass(owner):
        return {f.name: f.default for f in dataclasses.fields(owner)}[param]
    return inspect.signature(owner).parameters[param].default


@pytest.mark.parametrize("symbol,default,where", _defaults_table())
def test_defaults_table_matches_the_code(symbol, default, where):
    assert float(_code_default(where)) == float(default), f"docs/math.md#defaults: {symbol} = {default}, code {where}"


def test_defaults_table_is_read():
    assert len(_defaults_table()) >= 5
