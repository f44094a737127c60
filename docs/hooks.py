"""MkDocs hooks: let the pages keep the repository's own paths and the test suite's fence options.

- The figures live where the benchmarks and examples write them (benchmarks/results/, model_cards/). The pages
  link them by their repository path (`../benchmarks/results/x.png`, which GitHub renders), and the site gets a
  copy under `figures/`, with the links rewritten to it: no second copy in git, nothing that can drift.
- pytest-markdown-docs reads ```` ```python notest ```` and ```` ```python continuation ````; Python-Markdown's
  fences take no such words, so they are turned into a plain python fence (a titled one for `notest`).
"""

from __future__ import annotations

import re
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parent.parent
FIGURE_FOLDERS = {"benchmarks/results": "figures/benchmarks", "model_cards": "figures/model_cards"}
FOLDER_NAMES = "|".join(map(re.escape, FIGURE_FOLDERS))
FIGURE_LINK = re.compile(r"\]\(((?:\.\./)+)(" + FOLDER_NAMES + r")/([^)\s]+\.(?:png|svg))\)")
FENCE = re.compile(r"^(\s*)```python (notest|continuation)\s*$", re.MULTILINE)
NOTEST_TITLE = 'title="Not run by the test suite (the page says why)"'


def on_files(files, config):
    for folder, target in FIGURE_FOLDERS.items():
        for path in sorted((ROOT / folder).rglob("*.png")):
            src_uri = f"{target}/{path.relative_to(ROOT / folder).as_posix()}"
            files.append(File.generated(config, src_uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown, page, config, files):
    depth = page.file.src_uri.count("/")  # docs/x.md: 0, docs/guides/x.md: 1

    def figure(match: re.Match) -> str:
        ups, folder, rest = match.groups()
        if len(ups) // 3 != depth + 1:  # not a path from the repository root: leave it to --strict to report
            return match.group(0)
        return f"]({'../' * depth}{FIGURE_FOLDERS[folder]}/{rest})"

    def fence(match: re.Match) -> str:
        indent, option = match.groups()
        return f"{indent}```python" + (f" {NOTEST_TITLE}" if option == "notest" else "")

    return FENCE.sub(fence, FIGURE_LINK.sub(figure, markdown))
