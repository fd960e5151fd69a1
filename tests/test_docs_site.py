"""The documentation site builds with ``mkdocs build --strict`` (a broken link, a page outside
the nav or an API docstring that does not resolve fails), and the README stays a short
front page whose links land on files of the repository."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from conftest import needed
from doc_blocks import ROOT

README = ROOT / "README.md"
MAX_README_BYTES = 10 * 1024


def test_the_site_builds_strict_with_every_page_the_api_and_the_benchmarks(
    tmp_path: Path,
) -> None:
    needed("mkdocs", "docs")  # skipped without the docs extras, a failure under CI=true
    site = tmp_path / "site"
    build = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--quiet", "-d", str(site)],
        cwd=ROOT, capture_output=True, text=True, timeout=300,
        env={"PATH": "/usr/bin:/bin", "NO_MKDOCS_2_WARNING": "1", "HOME": str(tmp_path)},
    )  # fmt: skip
    assert build.returncode == 0, build.stdout[-3000:] + build.stderr[-3000:]
    docs = sorted(p for p in (ROOT / "docs").rglob("*.md") if "_hooks" not in p.parts)
    for page in docs:
        relative = page.relative_to(ROOT / "docs").with_suffix("")
        built = site / (relative.parent if relative.name == "index" else relative) / "index.html"
        assert built.is_file(), f"{page} was not built"
    api = (site / "reference" / "api" / "index.html").read_text()
    for name in ("open_store", "DistillDataset", "DistillLoss", "trainer_class", "StoreError"):
        assert 'id="kdcache.' in api and name in api, f"the API reference lacks {name}"
    assert "Args" in api or "Parameters" in api  # rendered from the docstrings
    results = site / "benchmarks" / "results"
    assert (results / "index.html").is_file() and (results / "fidelity.png").is_file()
    assert "kdcache benchmark results" in (results / "index.html").read_text()


def test_make_docs_without_the_docs_extras_says_what_to_install_in_one_line(
    tmp_path: Path,
) -> None:
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)  # a venv made by hand, without mkdocs
    run = subprocess.run(
        ["make", "--no-print-directory", "-C", str(ROOT), "docs", f"VENV={venv}"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert run.returncode == 2
    assert run.stdout == ""
    ours, make = run.stderr.splitlines()  # make adds its own "make: *** [...] Error 2"
    assert ours.startswith("Error: make docs needs the docs extras")
    assert re.match(r"make(\[\d+\])?: \*\*\* .*Error 2", make), make  # make[1] under make test
    assert "pip install -e '.[docs]'" in ours


def test_the_readme_is_short_and_its_links_land_in_the_repository() -> None:
    size = len(README.read_bytes())
    assert size <= MAX_README_BYTES, f"README.md has {size} bytes; move detail into docs/"
    text = README.read_text(encoding="utf-8")
    links = re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", text)
    assert len(links) >= 15
    for link in links:
        assert not link.startswith("/") and (ROOT / link).is_file(), f"README links {link}"
    # the two quickstart commands, as the Makefile's header gives them
    assert "make cache-teacher train-student" in text and "make test " in text
