"""The documentation's links: every relative link of README.md and docs/*.md names a file of the checkout, and every
#anchor a heading of that file (GitHub's heading slugs), so that what moved out of the README stays reachable. Nothing
links outside the checkout, and every citation of the method's spec (``docs/method.md, "<section>"``) names a section of
it."""

import re

import pytest

from knexp.paths import project_root

ROOT = project_root()
PAGES = [ROOT / "README.md", ROOT / "BENCHMARKS.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation other than - and _ dropped, spaces to hyphens."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def anchors(page) -> set[str]:
    text = re.sub(r"```.*?```", "", page.read_text(), flags=re.S)  # no headings inside code blocks
    return {slug(m.group(1)) for m in re.finditer(r"^#{1,6} (.+)$", text, flags=re.M)}


def test_the_slug_follows_githubs_rule():
    assert slug("Editing with the found neurons (`task=edit`)") == "editing-with-the-found-neurons-taskedit"
    assert slug("Sweeps: cache, resume, launchers, tuning") == "sweeps-cache-resume-launchers-tuning"


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_relative_link_and_anchor_resolves(page):
    broken = []
    for target in LINK.findall(page.read_text()):
        if re.match(r"[a-z]+:", target):
            continue  # a web address
        path, _, anchor = target.partition("#")
        linked = (page.parent / path).resolve() if path else page
        outside = ROOT not in linked.parents and linked != ROOT
        if outside or not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"


def _text_files():
    for folder in ("knexp", "conf", "tests", "docs", "examples"):
        yield from (p for p in (ROOT / folder).rglob("*")
                    if p.suffix in (".py", ".yaml", ".md") and "__pycache__" not in p.parts)
    yield from (ROOT / name for name in ("README.md", "BENCHMARKS.md", "Makefile", "run.py", "pyproject.toml"))


def test_nothing_names_a_file_outside_the_checkout():
    outside = "../" + "shared"  # written apart, so that this file does not name it either
    assert not [p.name for p in _text_files() if outside in p.read_text()]


def test_every_citation_of_the_spec_names_a_section_of_it():
    headings = [m.group(1) for m in re.finditer(r"^#{1,6} (.+)$", (ROOT / "docs" / "method.md").read_text(),
                                                flags=re.M)]
    cited = {re.sub(r"[\s#]+", " ", m.group(1)) for p in _text_files() if p.name not in ("method.md", "test_docs.py")
             for m in re.finditer(r'docs/method\.md, "([^"]+)"', p.read_text())}
    assert len(cited) >= 10
    assert not [c for c in cited if not any(h.startswith(c) for h in headings)]
