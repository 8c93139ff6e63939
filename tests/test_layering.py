"""Every import inside python/safeshape follows DESIGN.md's floors (## Layers): a module imports from a lower floor
or from inside its own package, never up or sideways, and no chain of imports forms a cycle. Imports are read with
`ast` from every module, module-level and function-level alike (a function-local import is an arrow too)."""
from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "python" / "safeshape"


def floors(design: str) -> dict[str, int]:
    """DESIGN.md's ``## Layers`` list: top-level name (module or package under safeshape) -> floor."""
    section = design.split("\n## Layers\n", 1)[1].split("\n## ", 1)[0]
    out = {}
    for m in re.finditer(r"^    (\d+)\s+(.+)$", section, re.M):
        for name in re.sub(r"\(.*?\)", "", m.group(2)).split(","):  # (notes) are not names
            out[name.strip()] = int(m.group(1))
    return out


def modules(package: Path) -> dict[str, Path]:
    """Dotted name -> file of every Python module of the package (``safeshape.eval`` for eval/__init__.py)."""
    out = {}
    for path in sorted(package.rglob("*.py")):
        parts = ("safeshape",) + path.relative_to(package).with_suffix("").parts
        out[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return out


def imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The safeshape modules that ``name`` imports anywhere in its file (``from X import y`` is X.y when that is
    a module, else X)."""
    is_package = path.name == "__init__.py"
    here = name.split(".") if is_package else name.split(".")[:-1]
    out = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            targets = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = ".".join(here[:len(here) - node.level + 1] + [node.module] if node.level else [node.module]) \
                if node.module else ".".join(here[:len(here) - node.level + 1])
            targets = [f"{base}.{a.name}" if f"{base}.{a.name}" in known else base for a in node.names]
        else:
            continue
        for t in targets:
            while t not in known and "." in t:  # import safeshape.ops.star -> that module; a name -> its module
                t = t.rsplit(".", 1)[0]
            if t in known and t != name:
                out.add(t)
    return out


def unit(module: str) -> str:
    """The top-level name under safeshape a module belongs to (``safeshape`` for the package's own __init__)."""
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "safeshape"


def violations(package: Path, design: str) -> list[str]:
    floor = floors(design)
    mods = modules(package)
    graph = {m: imports(m, p, set(mods)) for m, p in mods.items()}
    bad = [f"{m} is in no floor of DESIGN.md's ## Layers" for m in mods if unit(m) not in floor]
    for m, targets in graph.items():
        for t in sorted(targets):
            u, v = unit(m), unit(t)
            if u in floor and v in floor and u != v and floor[v] >= floor[u]:
                bad.append(f"{m} (floor {floor[u]}) imports {t} (floor {floor[v]})")
    # cycles (inside a package too): a depth-first search for a back edge
    state: dict[str, int] = {}

    def visit(m: str, stack: list[str]) -> None:
        state[m] = 1
        for t in sorted(graph[m]):
            if state.get(t) == 1:
                bad.append("import cycle: " + " -> ".join(stack[stack.index(t):] + [t]))
            elif t not in state:
                visit(t, stack + [t])
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m, [m])
    return bad


def test_imports_follow_the_floors_and_form_no_cycle():
    assert violations(PACKAGE, (ROOT / "DESIGN.md").read_text()) == []


def test_the_floors_name_every_top_level_module():
    named = set(floors((ROOT / "DESIGN.md").read_text()))
    present = {unit(m) for m in modules(PACKAGE)}
    assert present <= named, sorted(present - named)


@pytest.mark.parametrize("plant, want", [
    ("def f():\n    from .star import presets\n", "safeshape.data (floor 6) imports safeshape.star.presets (floor 8)"),
    ("from . import trainer\n", "safeshape.data (floor 6) imports safeshape.trainer (floor 9)"),
    ("from .models import load_tokenizer\n", "safeshape.data (floor 6) imports safeshape.models (floor 7)"),
    ("from .loss import DSSLoss\n", "safeshape.data (floor 6) imports safeshape.loss (floor 6)"),
])
def test_an_upward_or_sideways_import_is_caught(tmp_path, plant, want):
    import shutil

    pkg = tmp_path / "safeshape"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (pkg / "data.py").write_text((pkg / "data.py").read_text() + "\n\n" + plant)
    assert want in violations(pkg, (ROOT / "DESIGN.md").read_text())


def test_a_cycle_inside_a_package_is_caught(tmp_path):
    import shutil

    pkg = tmp_path / "safeshape"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (pkg / "star" / "presets.py").write_text((pkg / "star" / "presets.py").read_text() +
                                              "\n\ndef f():\n    from .annotate import annotate_file\n")
    assert any(v.startswith("import cycle:") and "safeshape.star.presets" in v for v in violations(pkg, (
        ROOT / "DESIGN.md").read_text()))


LOADERS = re.compile(r"Auto(Model\w*|Tokenizer)|\w+ForCausalLM|\w*Tokenizer(Fast)?")


def loads_outside_models(package: Path) -> list[str]:
    """``<model or tokenizer class>.from_pretrained(...)`` calls outside safeshape/models.py, the one loader
    (local files, safetensors only, errors naming the flag and folder)."""
    out = []
    for name, path in modules(package).items():
        if name == "safeshape.models":
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and \
                    node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name) and \
                    LOADERS.fullmatch(node.func.value.id):
                out.append(f"{name}:{node.lineno}: {node.func.value.id}.from_pretrained")
    return out


def test_models_and_tokenizers_load_in_one_place(tmp_path):
    import shutil

    assert loads_outside_models(PACKAGE) == []
    pkg = tmp_path / "safeshape"
    shutil.copytree(PACKAGE, pkg, ignore=shutil.ignore_patterns("*.so", "__pycache__"))
    (pkg / "hf.py").write_text((pkg / "hf.py").read_text() + "\n\ndef f(d):\n    from transformers import "
                               "AutoModelForCausalLM\n\n    return AutoModelForCausalLM.from_pretrained(d)\n")
    assert [v.split(":")[0] for v in loads_outside_models(pkg)] == ["safeshape.hf"]
