"""Run deptry once per folder, against the dependency groups that folder may import ([tool.goat_hf.deptry-folders]).

deptry checks one set of dependencies for a whole tree; this project declares a different set per folder (the core
package, goat_hf.tasks, examples/, benchmarks/, tests/), so each folder gets its own deptry run:
- its groups, and every group they pull in as goat_hf[...], are its regular dependencies: an import outside them is
  DEP001 (declared nowhere), DEP003 (only installed as another package's dependency) or DEP004 (declared in a group
  this folder may not use);
- the packages its own groups list directly must be imported there (DEP002), except the non-import ones listed in
  [tool.deptry.per_rule_ignores] DEP002 (commands, plugins, backends another package loads);
- the other folders' modules are first-party (tests import benchmarks/compare.py, and so on).
deptry finds the imports; this script only tells it which declarations to hold each folder to.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import tomllib  # Python 3.11+: CI's python3

CORE = "dependencies"  # the name a folder uses for [project] dependencies
SELF_REFERENCE = re.compile(r"^goat_hf\[(?P<groups>[^\]]+)\]$")


def package_name(requirement: str) -> str:
    """`transformers[serving]>=5.0 ; python_version>'3'` -> `transformers`."""
    return re.split(r"[\s\[<>=!~;@]", requirement.strip(), maxsplit=1)[0]


def group_packages(project: dict) -> dict[str, list[str]]:
    """Every group's requirements, the core under CORE, goat_hf[...] self-references kept as written."""
    return {CORE: project.get("dependencies", []), **project.get("optional-dependencies", {})}


def closure(groups: list[str], packages: dict[str, list[str]]) -> set[str]:
    """The groups named and every group they pull in through goat_hf[...], the core always included."""
    seen: set[str] = set()
    todo = [CORE, *groups]
    while todo:
        group = todo.pop()
        if group not in packages:
            known = ", ".join(sorted(packages))
            raise SystemExit(f"[tool.goat_hf.deptry-folders] names the group {group!r}; pyproject.toml has: {known}")
        if group in seen:
            continue
        seen.add(group)
        for requirement in packages[group]:
            if match := SELF_REFERENCE.match(requirement.strip()):
                todo.extend(name.strip() for name in match["groups"].split(","))
    return seen


def own_packages(groups: list[str], packages: dict[str, list[str]]) -> set[str]:
    """The packages the folder's groups list directly (self-references left out): these it must import."""
    return {package_name(r) for g in groups for r in packages[g] if not SELF_REFERENCE.match(r.strip())}


def deptry_command(folder: str, groups: list[str], pyproject: dict, first_party: set[str]) -> list[str]:
    packages = group_packages(pyproject["project"])
    allowed = closure(groups, packages)
    inherited = {package_name(r) for g in allowed for r in packages[g]} - own_packages(groups, packages)
    non_import = set(pyproject["tool"]["deptry"]["per_rule_ignores"]["DEP002"])
    folders = pyproject["tool"]["goat_hf"]["deptry-folders"]
    nested = [other for other in folders if other != folder and other.startswith(folder + "/")]
    return [
        *(sys.executable, "-m", "deptry", folder, "--no-ansi"),
        *("--optional-dependencies-dev-groups", ",".join(sorted(set(packages) - allowed - {CORE})) or "none"),
        *("--per-rule-ignores", "DEP002=" + "|".join(sorted(inherited | non_import))),
        *[arg for module in sorted(first_party) for arg in ("--known-first-party", module)],
        # Replaces deptry's default excludes, which leave tests/ out; a folder nested in this one has its own run.
        *[arg for path in ["__pycache__", *nested] for arg in ("--exclude", re.escape(path) + "(/|$)")],
    ]


def main() -> int:
    root = Path(__file__).resolve().parent.parent
    pyproject = tomllib.loads((root / "pyproject.toml").read_text())
    folders: dict[str, list[str]] = pyproject["tool"]["goat_hf"]["deptry-folders"]
    unchecked = set(group_packages(pyproject["project"])) - {g for groups in folders.values() for g in groups}
    if unchecked:
        print(f"no folder imports the group(s) {sorted(unchecked)}: list each under [tool.goat_hf.deptry-folders]")
        return 1
    first_party = {"goat_hf"} | {path.stem for folder in folders for path in (root / folder).glob("*.py")}
    failed = []
    for folder, groups in folders.items():
        print(f"== deptry {folder} (declared in: {', '.join(groups)})", flush=True)
        if subprocess.run(deptry_command(folder, groups, pyproject, first_party), cwd=root).returncode:
            failed.append(folder)
    print("deptry: " + (f"FAILED in {', '.join(failed)}" if failed else f"clean in all {len(folders)} folders"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
