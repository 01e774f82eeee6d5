"""The documentation's links: every relative link of README.md and docs/*.md names a file of the checkout, and every
#anchor a heading of that file (GitHub's heading slugs), so that what moved out of the README stays reachable."""

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
        if ROOT not in linked.parents and linked != ROOT:
            continue  # outside the checkout (../shared/METHOD.md)
        if not linked.exists() or (anchor and linked.suffix == ".md" and anchor not in anchors(linked)):
            broken.append(target)
    assert not broken, f"{page.name}: {broken}"
