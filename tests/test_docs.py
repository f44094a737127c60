"""What the docs' snippets cannot check themselves: the API reference covers the public API, the README's links into
docs/ land on a file and a heading that exist, and the README stays short. (`make docs` checks the site's own links
and API names with mkdocs --strict; the snippets run through the root conftest.py.)"""

from __future__ import annotations

import importlib
import re
import subprocess
import sys
from pathlib import Path

import pytest
from markdown.extensions.toc import slugify

import goat_hf

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
API_PAGE = ROOT / "docs" / "reference" / "api.md"
LINK = re.compile(r"\]\(([^)\s]+)\)")
HEADING = re.compile(r"^#{1,6} (.+)$", re.MULTILINE)
FENCED = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def documented_objects() -> dict[str, object]:
    """{name: object} for every `::: module.name` directive of the API page, imported the way mkdocstrings would."""
    objects = {}
    for path in re.findall(r"^::: ([\w.]+)$", API_PAGE.read_text(), re.MULTILINE):
        module, name = path.rsplit(".", 1)
        objects[name] = getattr(importlib.import_module(module), name)
    return objects


def test_api_reference_documents_every_public_name():
    # catches a name added to goat_hf.__all__ (a new trainer, say) with no entry in the API reference, and an entry
    # whose module path names another object than the one `from goat_hf import X` gives
    documented = documented_objects()
    public = [name for name in goat_hf.__all__ if name != "__version__"]
    assert sorted(set(public) - set(documented)) == []
    for name in public:
        assert documented[name] is getattr(goat_hf, name), name


def anchors(page: Path) -> set[str]:
    """The heading ids MkDocs (Python-Markdown's toc) gives a page, code fences skipped."""
    text = FENCED.sub("", page.read_text())
    return {slugify(re.sub(r"[`*]", "", heading).strip(), "-") for heading in HEADING.findall(text)}


def readme_links() -> list[str]:
    text = FENCED.sub("", README.read_text())
    return [link for link in LINK.findall(text) if not re.match(r"[a-z]+:", link)]


def test_readme_links_land_on_files_and_headings():
    # catches a docs page renamed or a heading retitled while the README still points at the old one
    links = readme_links()
    assert any(link.startswith("docs/") for link in links)
    for link in links:
        path, _, anchor = link.partition("#")
        target = ROOT / path
        assert target.exists(), f"README links {link!r}: {path} does not exist"
        if anchor:
            assert anchor in anchors(target), f"README links {link!r}: {path} has no heading with that id"


@pytest.mark.parametrize(
    ("page", "expected"),
    [
        ("docs/results.md", "reference-numbers-paper-8-experts-top-2"),
        ("docs/guides/big_models.md", "what-was-tested-where"),
    ],
)
def test_anchor_ids_match_mkdocs(page, expected):
    # the helper above must produce the ids the built site has (mkdocs --strict validated these two)
    assert expected in anchors(ROOT / page)


def test_readme_is_short_and_keeps_the_two_commands():
    text = README.read_text()
    assert len(text.splitlines()) <= 200
    assert "make demo" in text and "make test" in text
    assert any("Results" in heading for heading in HEADING.findall(FENCED.sub("", text)))


def test_readme_decode_table_is_the_benchmark_results():
    """The Serving table is generated from benchmarks/results/bench_decode_cpu*.json: a hand edit or a new result
    left out of the README fails here (fix: python benchmarks/decode_table.py --write)."""
    check = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "decode_table.py")], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout
