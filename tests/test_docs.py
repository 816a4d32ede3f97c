"""The documentation's links: every relative link in README.md and docs/*.md names a file or
folder of the repository, and every #fragment names a heading of its target (GitHub's anchor
rule), so that moving a section cannot leave a dangling reference behind."""
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DOCS = [ROOT / "README.md"] + sorted((ROOT / "docs").glob("*.md"))
LINK = re.compile(r"\[([^\]]*)\]\(([^)\s]+)\)")


def _prose(text):
    """(line number, line) outside fenced code blocks (code may hold brackets that are not links)."""
    out, fence = [], False
    for i, line in enumerate(text.split("\n")):
        if line.startswith("```"):
            fence = not fence
        elif not fence:
            out.append((i + 1, line))
    return out


def anchors(path):
    """GitHub's anchors for a Markdown file's headings: lowercased, punctuation other than '-'
    and '_' dropped, spaces to '-', repeats suffixed -1, -2, ..."""
    seen, out = {}, set()
    for _, line in _prose(path.read_text(encoding="utf-8")):
        m = re.match(r"#{1,6} (.*)", line)
        if not m:
            continue
        a = re.sub(r"[^\w\- ]", "", m.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(a, 0)
        seen[a] = n + 1
        out.add(a if n == 0 else f"{a}-{n}")
    return out


def links(path):
    for n, line in _prose(path.read_text(encoding="utf-8")):
        for m in LINK.finditer(line):
            url = m.group(2)
            if not re.match(r"[a-z]+:", url):  # http:, https:, mailto: are not checked here
                yield n, url


def test_anchor_rule():
    p = ROOT / "README.md"
    a = anchors(p)
    assert "use-from-cc" in a and "running-a-real-openelm-model" in a


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(doc):
    bad = []
    for line, url in links(doc):
        path, _, frag = url.partition("#")
        target = (doc.parent / path).resolve() if path else doc
        if not target.exists():
            bad.append(f"line {line}: {url}: no such file")
        elif frag and target.suffix == ".md" and frag not in anchors(target):
            bad.append(f"line {line}: {url}: no heading with that anchor in {target.name}")
    assert not bad, f"{doc.relative_to(ROOT)}:\n" + "\n".join(bad)
