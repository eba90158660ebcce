"""Every citation in the repository resolves inside it: a clone must explain itself.

Code, proto comments and the README cite the project's own docs/ as `docs/NAME.md section N`
(or `sections N, M and P`, `sections N-M`); each cited file must exist and have a heading
numbered N. Nothing may point outside the repository (the development workspace's notes,
which a clone does not have).
"""

import re
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
NUM = r"\d+(?:\.\d+)?"
CITATION = re.compile(rf"docs/([\w.-]+\.md)(?:\s+(?:sections?\s+)?({NUM}(?:(?:\s*-\s*|,\s*|\s+and\s+){NUM})*))?")
BARE_SECTION = re.compile(rf"(?<![\w/.-]\.md\s)(?<!\.md\s\s)\bsections?\s+{NUM}")
# Pointers to the development workspace's own notes (spelt in pieces, so that this file is not one).
_WORKSPACE = ["../" + "shared", "shared/" + "reference", "xen-" + "semantics", "linux-" + "guest.md", "DESIGN.md", "STYLE.md"]
OUTSIDE = re.compile("|".join(map(re.escape, _WORKSPACE)) + r"|(?<!docs/)\btransport\.md")


def _sources() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    here = Path(__file__).relative_to(REPO).as_posix()  # this file names the patterns it looks for
    return [REPO / n for n in names if n != here and not n.startswith("xensim/v1/") and n.endswith((".py", ".proto", ".md", ".yml", ".toml", "Dockerfile"))]


def _headings(doc: Path) -> set[str]:
    return {m.group(1) for m in re.finditer(rf"^#+\s+({NUM})[.\s]", doc.read_text(), re.M)}


def test_every_docs_citation_names_a_file_and_a_numbered_heading_in_it():
    unresolved = []
    for path in _sources():
        for m in CITATION.finditer(path.read_text()):
            doc = REPO / "docs" / m.group(1)
            where = f"{path.relative_to(REPO)}: {m.group(0)!r}"
            if not doc.is_file():
                unresolved.append(f"{where}: no such file")
                continue
            for number in re.findall(NUM, m.group(2) or ""):
                if number not in _headings(doc):
                    unresolved.append(f"{where}: {m.group(1)} has no section {number}")
    assert not unresolved, "\n".join(unresolved)


def test_nothing_cites_material_outside_the_repository():
    outside = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p in _sources() for n, line in enumerate(p.read_text().splitlines(), 1) if OUTSIDE.search(line)]
    assert not outside, "\n".join(outside)


@pytest.mark.parametrize("directory", ["hypervisor", "guestlib", "proto", "xensim"])
def test_a_section_number_always_says_which_document(directory):
    sources = [p for p in _sources() if p.relative_to(REPO).parts[0] == directory]
    lines = [(p, n, line) for p in sources for n, line in enumerate(p.read_text().splitlines(), 1)]
    bare = [f"{p.relative_to(REPO)}:{n}: {line.strip()}" for p, n, line in lines if BARE_SECTION.search(line) and "docs/" not in line]
    assert not bare, "\n".join(bare)
