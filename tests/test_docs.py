"""Every path the README and docs/ name exists: file references in backticks that start with
a folder of the repository, and relative Markdown links."""

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOP = ("biovita/", "ray_jobs/", "tune/", "cluster/", "benchmarks/", "tests/", "docs/", ".ci/")
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]


def _named(doc: Path) -> set[Path]:
    text = doc.read_text()
    paths = set()
    for code in re.findall(r"`([^`\n]+)`", text):
        for word in code.split():
            word = word.strip("(),;:'\"")
            if word.startswith(TOP) and not any(c in word for c in "<>*{$"):
                paths.add(ROOT / word.split("::")[0])
    for link in re.findall(r"\]\(([^)#\s]+)", text):
        if "://" not in link:
            paths.add((doc.parent / link).resolve())
    return paths


def test_the_docs_name_paths():
    assert sum(len(_named(d)) for d in DOCS) > 20  # the pattern finds what the docs cite


def test_every_path_named_exists():
    missing = [f"{d.relative_to(ROOT)}: {p.relative_to(ROOT) if p.is_relative_to(ROOT) else p}"
               for d in DOCS for p in sorted(_named(d)) if not p.exists()]
    assert not missing, "\n".join(missing)


def test_readme_is_short():
    assert len((ROOT / "README.md").read_text().splitlines()) <= 200
