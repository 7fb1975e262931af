"""The front page and the guides: every relative link in README.md and docs/*.md reaches a file that exists
and, with a #anchor, a heading that page holds; the README stays a front page with its two commands."""

import re
from pathlib import Path
from urllib.parse import unquote

import pytest

ROOT = Path(__file__).resolve().parents[1]
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
LINK = re.compile(r"\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")  # [text](target "title"), ![alt](...)
FENCE = re.compile(r"^\s*(```|~~~)")


def prose_lines(text: str, code_spans: bool = False) -> list[str]:
    """The page's lines outside fenced code blocks; inline code spans blanked out unless code_spans."""
    out, fenced = [], False
    for line in text.splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            out.append(line if code_spans else re.sub(r"`[^`]*`", "``", line))
    return out


def anchors(text: str) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped (word characters, spaces, - and _ stay), spaces
    to hyphens; a repeated heading gets -1, -2, ..."""
    seen: dict[str, int] = {}
    ids = set()
    for line in prose_lines(text, code_spans=True):
        match = re.match(r"^#{1,6}\s+(.*?)\s*#*\s*$", line)
        if not match:
            continue
        slug = re.sub(r"[^\w\- ]", "", match.group(1).strip().lower()).replace(" ", "-")
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        ids.add(slug if n == 0 else f"{slug}-{n}")
    return ids


def relative_links(page: Path) -> list[str]:
    links = [target for line in prose_lines(page.read_text()) for target in LINK.findall(line)]
    return [t for t in links if not re.match(r"^[a-z][a-z0-9+.-]*:", t)]  # http:, https:, mailto: ...


def test_anchor_slugs_follow_github():
    text = (
        "# Ablations and studies\n"
        "## Results (measured: 2 CPU cores, torch 2.13.0+cpu)\n"
        "## Results (measured: 2 CPU cores, torch 2.13.0+cpu)\n"
        "### `fit` × 8 seeds\n"
        "```\n# not a heading\n```\n"
    )
    assert anchors(text) == {
        "ablations-and-studies",
        "results-measured-2-cpu-cores-torch-2130cpu",
        "results-measured-2-cpu-cores-torch-2130cpu-1",
        "fit--8-seeds",
    }


def test_link_finder_skips_code_and_urls(tmp_path):
    page = tmp_path / "p.md"
    page.write_text('[a](x.md) `[b](y.md)` ![c](img/c.png "title") [d](https://e.org/f)\n```\n[g](z.md)\n```\n')
    assert relative_links(page) == ["x.md", "img/c.png"]


@pytest.mark.parametrize("page", PAGES, ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves(page):
    broken = []
    for target in relative_links(page):
        path, _, anchor = unquote(target).partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            broken.append(f"{target}: no file {file.relative_to(ROOT) if file.is_relative_to(ROOT) else file}")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file.read_text()):
            broken.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not broken, "\n".join(broken)


def test_readme_is_a_front_page_with_its_two_commands():
    text = (ROOT / "README.md").read_text()
    assert len(text.splitlines()) <= 150
    setup = 'pip install torch==2.13.0 && pip install -e ".[dev]" && python scripts/fit.py --config configs/moe4.yaml'
    assert setup in text.splitlines()
    assert "HF_HUB_OFFLINE=1 python -m pytest -q" in text.splitlines()
    ci = (ROOT / ".ci" / "run").read_text()
    assert "\nHF_HUB_OFFLINE=1 python -m pytest -q\n" in ci  # CI runs exactly the README's test command
    assert sum(f"](docs/{p.name}" in text for p in PAGES[1:]) >= 8  # the guides are linked from the front page
