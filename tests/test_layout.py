"""The tree keeps the shape docs/architecture.md §2 describes: import rules, module sizes, and no
reference that leaves the repository."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# folder → installed package (pyproject's package-dir)
PACKAGES = {"storage": "kdcache.storage", "pipeline": "kdcache.pipeline"}
STAGES = ("cache", "distill", "search")
# a stage may not import these (docs/architecture.md §2)
FORBIDDEN = {
    "kdcache.storage": ("kdcache.pipeline",),
    "kdcache.pipeline.cache": ("kdcache.pipeline.distill", "kdcache.pipeline.search"),
    "kdcache.pipeline.distill": ("kdcache.pipeline.cache", "kdcache.pipeline.search"),
    "kdcache.pipeline.search": ("kdcache.pipeline.cache",),
}
RECIPES = (
    "kdcache.pipeline.cache.cache_teacher",
    "kdcache.pipeline.cache.default_teacher",
    "kdcache.pipeline.distill.train_student",
    "kdcache.pipeline.distill.compare",
    "kdcache.pipeline.search.sweep",
)
MAX_LINES = 400


def source_modules() -> dict[str, Path]:
    """Every module of the installed packages: dotted name → file."""
    modules = {}
    for folder, package in PACKAGES.items():
        for path in sorted((ROOT / folder).rglob("*.py")):
            parts = path.relative_to(ROOT / folder).with_suffix("").parts
            if parts[-1] == "__init__":
                parts = parts[:-1]
            modules[".".join((package, *parts))] = path
    return modules


def imported_modules(path: Path, module: str) -> set[str]:
    """Absolute names of every module ``path`` imports, at any depth (lazy imports included)."""
    is_package = path.name == "__init__.py"
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            if node.level:  # relative: resolve against this module's package
                base = module.split(".")
                base = base if is_package else base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, node.module] if node.module else base)
            else:
                target = node.module or ""
            names.add(target)
            names |= {f"{target}.{alias.name}" for alias in node.names}
    return names


MODULES = source_modules()


def test_the_stages_are_packages_with_a_docstring_that_states_their_imports() -> None:
    for stage in STAGES:
        init = ROOT / "pipeline" / stage / "__init__.py"
        doc = ast.get_docstring(ast.parse(init.read_text()))
        assert doc and "import" in doc, f"{init} must say what it holds and what it may import"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_imports_follow_the_stage_rules(module: str) -> None:
    imports = imported_modules(MODULES[module], module)
    for owner, forbidden in FORBIDDEN.items():
        if module == owner or module.startswith(owner + "."):
            bad = sorted(i for i in imports for f in forbidden if i == f or i.startswith(f + "."))
            assert not bad, f"{module} imports {bad}; see docs/architecture.md §2"
    if module != "kdcache.pipeline.cli":
        from_recipes = sorted(
            i for i in imports for r in RECIPES if r != module and (i == r or i.startswith(r + "."))
        )
        assert not from_recipes, f"{module} imports from a recipe module: {from_recipes}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_no_module_over_400_lines(module: str) -> None:
    lines = len(MODULES[module].read_text().splitlines())
    assert lines <= MAX_LINES, f"{MODULES[module]} has {lines} lines; split it along a seam"


def test_the_cli_reaches_every_recipe() -> None:
    from kdcache.pipeline.cli import COMMANDS

    targets = {spec.split(":")[0] for spec in COMMANDS.values()}
    assert set(RECIPES) <= targets and targets <= set(MODULES)


def test_nothing_points_outside_the_repository() -> None:
    """The design lives in docs/; no file cites the founding contract or a sibling folder."""
    tracked = subprocess.run(
        ["git", "ls-files", "--cached", "--others", "--exclude-standard"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    ).stdout.split()
    offenders = []
    for name in tracked:
        path = ROOT / name
        if path.suffix not in {".py", ".md", ".toml", ".yaml", ".cfg", ""} or not path.is_file():
            continue
        if path.resolve() == Path(__file__).resolve():
            continue
        text = path.read_text(errors="replace")
        if "DESIGN.md" in text or "../shared" in text:
            offenders.append(name)
    assert not offenders, f"cite docs/architecture.md instead: {offenders}"


def test_the_design_page_names_every_folder_of_the_tree() -> None:
    page = (ROOT / "docs" / "architecture.md").read_text()
    for folder in ("storage/", "pipeline/", *(f"{stage}/" for stage in STAGES), "tests/", "bench/"):
        assert folder in page
    for module, path in MODULES.items():
        if module.startswith("kdcache.pipeline") and path.name != "__init__.py":
            assert path.name in page, f"docs/architecture.md §2 does not mention {path.name}"
