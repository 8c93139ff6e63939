"""The README and the docs/ pages link to files and headings that exist, and docs/README.md indexes every page."""
import re
from pathlib import Path

from tests.test_docs_math import slug

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")


def pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def unfenced(text: str) -> str:
    return re.sub(r"^```.*?^```", "", text, flags=re.M | re.S)


def prose(text: str) -> str:
    """The text outside code fences and inline code (links there are examples, not links)."""
    return re.sub(r"`[^`\n]*`", "", unfenced(text))


def headings(page: Path) -> set[str]:
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", unfenced(page.read_text()), flags=re.M)}


def links(page: Path) -> list[tuple[str, Path | None, str]]:
    """(target as written, the file it names or None for the page itself, anchor) of each relative link."""
    out = []
    for target in LINK.findall(prose(page.read_text())):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        out.append((target, (page.parent / path).resolve() if path else None, anchor))
    return out


def rel(path: Path, root: Path = ROOT) -> str:
    return str(path.relative_to(root)) if path.is_relative_to(root) else str(path)


def broken_links(files: list[Path], root: Path = ROOT, pending: set[str] = frozenset()) -> list[str]:
    broken = []
    for page in files:
        for target, path, anchor in links(page):
            if path is not None and not path.exists():
                if rel(path, root) not in pending:
                    broken.append(f"{rel(page, root)}: {target} (no such file)")
                continue
            linked = path or page
            if anchor and linked.suffix == ".md" and anchor not in headings(linked):
                broken.append(f"{rel(page, root)}: {target} (no heading #{anchor} in {rel(linked, root)})")
    return broken


def test_every_relative_link_resolves():
    broken = broken_links(pages())
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_the_checker_finds_a_missing_file_and_a_missing_heading(tmp_path):
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "b.md").write_text("# B\n\n## Two words\n\n## With `code`\n")
    (tmp_path / "docs" / "a.md").write_text(
        "# A page\n\n[ok](#a-page) [here](b.md#two-words) [code](b.md#with-code) [gone](c.md) [later](d.md) [no](b.md#three) "
        "![img](b.md) `[code](e.md)`\n\n```\n[fenced](f.md)\n```\n[web](https://example.com/x.md)\n")
    assert broken_links([tmp_path / "docs" / "a.md"], tmp_path, {"docs/d.md"}) == [
        "docs/a.md: c.md (no such file)", "docs/a.md: b.md#three (no heading #three in docs/b.md)"]


def test_the_index_and_the_readme_list_every_page():
    index = {rel(p) for _, p, _ in links(DOCS / "README.md") if p is not None}
    readme = {rel(p) for _, p, _ in links(ROOT / "README.md") if p is not None}
    every = {rel(p) for p in DOCS.glob("*.md") if p.name != "README.md"}
    assert not every - index, f"pages docs/README.md does not list: {sorted(every - index)}"
    assert not every - readme, f"pages README.md does not link: {sorted(every - readme)}"

