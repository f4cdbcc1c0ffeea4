"""Every Markdown link in README.md, docs/*.md, bench/README.md and bench/*/README.md points somewhere that exists.

Relative targets must name an existing file or folder (relative to the Markdown file), and an
`#anchor` (alone, or after a `.md` file) must match a heading's GitHub-style slug in that file.
http(s) and mailto links are not fetched. Reads files only: no product code is imported.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

_FENCE = re.compile(r"^\s*(```|~~~)")
_HEADING = re.compile(r"^ {0,3}(#{1,6})\s+(.*?)\s*#*\s*$")
_CODE_SPAN = re.compile(r"(`+)(.+?)\1")
# [text](target) or [text](target "title"); the text may hold code spans but no brackets.
_LINK = re.compile(r"\[[^\[\]]*\]\(\s*<?([^\s)>]*)>?(?:\s+\"[^\"]*\")?\s*\)")
_EXTERNAL = ("http://", "https://", "mailto:")


def doc_files() -> list[Path]:
    files = [ROOT / "README.md", ROOT / "bench" / "README.md", *sorted((ROOT / "bench").glob("*/README.md")),
             *sorted((ROOT / "docs").glob("*.md"))]
    return [f for f in files if f.is_file()]


def _prose_lines(text: str):
    """(line number, line) outside fenced code blocks."""
    in_fence = False
    for number, line in enumerate(text.splitlines(), 1):
        if _FENCE.match(line):
            in_fence = not in_fence
            continue
        if not in_fence:
            yield number, line


def slugify(heading: str) -> str:
    """GitHub's anchor for a heading: markup dropped, lowercased, punctuation removed, spaces -> '-'."""
    text = _CODE_SPAN.sub(lambda m: m.group(2), heading)
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", text)  # links and images: keep their text
    text = re.sub(r"<[^>]+>", "", text)  # inline HTML
    text = text.replace("*", "").replace("~", "")
    text = text.strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)  # \w keeps letters, digits and '_' (unicode included)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    """Slugs of every heading in a Markdown file, with GitHub's -1, -2 suffixes for repeats."""
    seen: dict[str, int] = {}
    out: set[str] = set()
    for _, line in _prose_lines(path.read_text(encoding="utf-8")):
        m = _HEADING.match(line)
        if not m:
            continue
        slug = slugify(m.group(2))
        if slug in seen:
            seen[slug] += 1
            out.add(f"{slug}-{seen[slug]}")
        else:
            seen[slug] = 0
            out.add(slug)
    return out


def links(path: Path) -> list[tuple[int, str]]:
    """(line number, target) of every inline Markdown link outside code."""
    found = []
    for number, line in _prose_lines(path.read_text(encoding="utf-8")):
        # a link inside a code span is not a link; blanking spans keeps link text that holds one
        stripped = _CODE_SPAN.sub(lambda m: " " * len(m.group(0)), line)
        for m in _LINK.finditer(stripped):
            found.append((number, m.group(1)))
    return found


def check_file(path: Path) -> list[str]:
    """Problems with the links of one Markdown file; empty when every link resolves."""
    problems = []
    for number, target in links(path):
        where = f"{path.name}:{number}: ({target})"
        if not target:
            problems.append(f"{where} empty target")
            continue
        if target.lower().startswith(_EXTERNAL):
            continue
        file_part, _, anchor = target.partition("#")
        dest = (path.parent / file_part).resolve() if file_part else path
        if not dest.exists():
            problems.append(f"{where} no such file {dest}")
            continue
        if anchor:
            if dest.is_dir() or dest.suffix.lower() != ".md":
                problems.append(f"{where} anchor on a non-Markdown target")
            elif anchor.lower() not in anchors(dest):
                problems.append(f"{where} no heading #{anchor} in {dest.name}")
    return problems


def test_the_documentation_exists():
    names = {f.relative_to(ROOT).as_posix() for f in doc_files()}
    assert "README.md" in names and "bench/README.md" in names
    assert any(n.startswith("docs/") for n in names), names


@pytest.mark.parametrize("path", doc_files(), ids=lambda p: p.relative_to(ROOT).as_posix())
def test_links_resolve(path: Path):
    assert check_file(path) == []


def test_slugs_follow_github():
    assert slugify("Live views: `/debug/` and `epp status`") == "live-views-debug-and-epp-status"
    assert slugify("Against real vLLM (NixlConnector on CPU)") == "against-real-vllm-nixlconnector-on-cpu"
    assert slugify("Objectives, sheddable requests and model rewrites") == (
        "objectives-sheddable-requests-and-model-rewrites"
    )
    assert slugify("Try it: `make up` / `epp up`") == "try-it-make-up--epp-up"
    assert slugify("snake_case **bold**") == "snake_case-bold"


def test_checker_reports_broken_links(tmp_path: Path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "other.md").write_text("# Other page\n\n## A section\n", encoding="utf-8")
    page = tmp_path / "page.md"
    page.write_text(
        "# Title\n\n## Same\n\n## Same\n\n"
        "[ok file](other.md) [ok anchor](other.md#a-section) [ok local](#title) [ok repeat](#same-1)\n"
        "[ok dir](sub) [ok web](https://example.com/x#y) [ok mail](mailto:a@b.c)\n"
        "[`code` text](other.md)\n"
        "`[not a link](nowhere.md)`\n"
        "```\n[in a fence](nowhere.md)\n# not a heading\n```\n"
        "[bad file](missing.md)\n"
        "[bad anchor](#nope)\n"
        "[bad remote anchor](other.md#nope)\n"
        "[fenced heading](#not-a-heading)\n",
        encoding="utf-8",
    )
    problems = check_file(page)
    assert len(problems) == 4, problems
    assert "missing.md" in problems[0] and "no such file" in problems[0]
    assert "#nope" in problems[1] and "page.md" in problems[1]
    assert "#nope" in problems[2] and "other.md" in problems[2]
    assert "#not-a-heading" in problems[3]
    assert all("nowhere" not in p for p in problems)
