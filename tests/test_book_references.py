"""The book stands alone: every reference a reader meets resolves inside the repository.

A learner has only the public repository. These tests fail when any tracked file
* points outside it (a path into a folder beside the clone, or the name of a design document the project
  does not ship),
* names an upper-case document (``SOMETHING.md``) that no tracked file is called,
* cites a ``docs/`` page that does not exist, or a section of one (``docs/reference.md §6``,
  ``docs/bugs.md B08``, ``docs/bugs.md C19``, ``docs/task-world.md §7.7``) that has no heading,
* or links (Markdown ``[text](path)``) to a relative path that does not exist.
"""
from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TEXT_SUFFIXES = {".py", ".md", ".ipynb", ".cpp", ".cu", ".h", ".toml", ".cfg", ".txt", ""}

# Names of documents that exist outside the repository only; written in pieces so that this file
# does not match itself.
OUTSIDE = re.compile("|".join([r"\.\./" + "shared", "PIT" + "FALLS", "REFER" + r"ENCE\.md", "REFER" + "ENCE §",
                               "PPO-" + "NOTES", "TASKWORLD-" + "NOTES", "DES" + r"IGN\.md", "STY" + r"LE\.md"]))
DOC_NAME = re.compile(r"\b([A-Z][A-Z0-9_-]{2,}\.md)\b")
DOCS_CITE = re.compile(r"docs/([\w.-]+\.md)(?:[,:]?\s+(§\d+(?:\.\d+)?|[BC]\d+))?")
MD_LINK = re.compile(r"\]\(((?!https?:|#|mailto:)[^)\s]+)\)")


def tracked_files() -> list[Path]:
    """Tracked text files (git ls-files), or every file under the repository outside a git checkout."""
    try:
        out = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
        paths = [REPO / p for p in out.splitlines()]
    except (OSError, subprocess.CalledProcessError):
        paths = [p for p in REPO.rglob("*") if p.is_file() and ".git" not in p.parts and ".venv" not in p.parts]
    # the data files under datasets/ are data (real samples quote the outside world); their .md pages are ours
    return [p for p in paths if p.suffix in TEXT_SUFFIXES and p.is_file()
            and ("datasets" not in p.relative_to(REPO).parts or p.suffix == ".md")]


def text_of(path: Path) -> str:
    """The text a reader sees: for a notebook, its cells' sources and text outputs (not images)."""
    raw = path.read_text(encoding="utf-8", errors="replace")
    if path.suffix != ".ipynb":
        return raw
    import json

    nb = json.loads(raw)
    parts = []
    for cell in nb["cells"]:
        parts.append("".join(cell.get("source", "")))
        for out in cell.get("outputs", []):
            parts.append("".join(out.get("text", "")))
            parts.append("".join(out.get("data", {}).get("text/plain", "")))
    return "\n".join(parts)


def headings(page: Path) -> list[str]:
    return [line.lstrip("#").strip() for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("#")]


def section_exists(page: Path, section: str) -> bool:
    """``§7.7`` matches a heading starting ``7.7`` (or ``7.7.``); ``B08`` / ``C19`` a heading starting with it."""
    key = section.lstrip("§")
    pattern = re.compile(rf"^{re.escape(key)}(?:\.|\s|$)")
    return any(pattern.match(h) for h in headings(page))


FILES = tracked_files()


def _hits(regex, predicate=lambda m: True):
    found = []
    for path in FILES:
        if path.name == Path(__file__).name:
            continue
        for n, line in enumerate(text_of(path).splitlines(), 1):
            for m in regex.finditer(line):
                if predicate(m):
                    found.append(f"{path.relative_to(REPO)}:{n}: {m.group(0)}")
    return found


def test_no_file_points_outside_the_repository():
    assert FILES, "no tracked files found"
    assert _hits(OUTSIDE) == []


def test_every_named_document_is_in_the_repository():
    names = {p.name for p in FILES} | {p.name for p in REPO.rglob("*.md") if ".venv" not in p.parts}
    assert _hits(DOC_NAME, lambda m: m.group(1) not in names) == []


def test_every_docs_citation_names_a_page_and_a_section_that_exist():
    def broken(m):
        page = REPO / "docs" / m.group(1)
        return not page.is_file() or (m.group(2) is not None and not section_exists(page, m.group(2)))

    cites = _hits(DOCS_CITE)
    assert len(cites) > 50, "the source cites docs/ pages; the pattern must find them"
    assert _hits(DOCS_CITE, broken) == []


def test_every_relative_markdown_link_resolves():
    bad = []
    for path in FILES:
        if path.suffix not in (".md", ".ipynb"):
            continue
        for m in MD_LINK.finditer(text_of(path)):
            target = m.group(1).split("#")[0]
            if target and not (path.parent / target).exists():
                bad.append(f"{path.relative_to(REPO)}: {m.group(1)}")
    assert bad == []


@pytest.mark.parametrize("text, ok", [("see docs/bugs.md B08", True), ("see docs/bugs.md B99", False),
                                      ("docs/reference.md §6", True), ("docs/reference.md §66", False),
                                      ("docs/nothing.md", False)])
def test_the_citation_check_can_fail(text, ok):
    m = DOCS_CITE.search(text)
    page = REPO / "docs" / m.group(1)
    assert (page.is_file() and (m.group(2) is None or section_exists(page, m.group(2)))) == ok


def test_every_test_a_page_names_exists():
    """docs/bugs.md and docs/reference.md name the tests that guard each case (``tests/test_x.py::test_y``):
    each named test function exists, so a rename cannot leave a page pointing at nothing."""
    defined = {(p.name, m.group(1)) for p in (REPO / "tests").glob("test_*.py")
               for m in re.finditer(r"^def (test_\w+)", p.read_text(encoding="utf-8"), re.M)}
    named = [(path.name, m.group(1), m.group(2)) for path in FILES
             if path.suffix in (".md", ".ipynb", ".py") and path.name != Path(__file__).name
             for m in re.finditer(r"tests/(test_\w+\.py)::(test_\w+)", text_of(path))]
    assert len(named) > 20, "docs/bugs.md names its guarding tests; the pattern must find them"
    assert [n for n in named if (n[1], n[2]) not in defined] == []
