"""MkDocs hooks of the kdcache site (mkdocs.yml ``hooks:``).

- The API reference: ``kdcache.storage`` and ``kdcache.pipeline`` install from ``storage/`` and
  ``pipeline/`` (pyproject's package-dir), a layout mkdocstrings cannot read statically, so
  ``build/docs-api/kdcache/`` links both folders under their installed names.
- The benchmark results join the site without a copy in docs/: ``bench/RESULTS.md`` becomes the
  page ``benchmarks/results.md`` and every file of ``bench/results/`` (its sections and plots)
  ``benchmarks/results/<name>``, so the page's own links (``results/fidelity.png``) resolve and
  ``make bench`` stays the one thing that writes them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from mkdocs.structure.files import File, Files

ROOT = Path(__file__).resolve().parents[2]
API_TREE = ROOT / "build" / "docs-api" / "kdcache"  # mkdocs.yml: mkdocstrings paths


def link_api_tree() -> None:
    """Link storage/ and pipeline/ as kdcache.storage and kdcache.pipeline for mkdocstrings."""
    API_TREE.mkdir(parents=True, exist_ok=True)
    # a regular package: griffe would merge a namespace with any other `kdcache` on sys.path
    # (the console script in the venv's bin/)
    (API_TREE / "__init__.py").write_text('"""kdcache (for the API reference only)."""\n')
    for folder in ("storage", "pipeline"):
        link = API_TREE / folder
        if not link.is_symlink():
            link.symlink_to(ROOT / folder, target_is_directory=True)


# at import: mkdocstrings keeps only the `paths` that exist when its handler starts, which is
# before any hook's on_config (a fresh clone has no build/ yet)
link_api_tree()


def on_files(files: Files, config: Any) -> Files:
    """Add bench/RESULTS.md and bench/results/* to the site's files."""
    bench = ROOT / "bench"
    sources = {"benchmarks/results.md": bench / "RESULTS.md"}
    for path in sorted((bench / "results").iterdir()):
        if path.suffix in {".md", ".png"}:
            sources[f"benchmarks/results/{path.name}"] = path
    for uri, path in sources.items():
        files.append(File.generated(config, uri, abs_src_path=str(path)))
    return files


def on_page_markdown(markdown: str, page: Any, config: Any, files: Files) -> str:
    """bench/results/<name>.md link their plots as RESULTS.md sees them (``results/x.png``)."""
    if page.file.src_uri.startswith("benchmarks/results/"):
        return markdown.replace("](results/", "](")
    return markdown
