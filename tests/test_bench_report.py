"""`bench/report.py` puts the machine's facts on top of every benchmark section."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_report():  # bench/ is a folder of scripts, not a package
    spec = importlib.util.spec_from_file_location("bench_report", ROOT / "bench" / "report.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_report_has_machine_facts_then_sections_in_name_order(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    (results / "b_store.md").write_text("## Store size\n\n| k | bytes/token |\n| 64 | 190 |\n")
    (results / "a_loader.md").write_text("loader: 1.2M tokens/s\n")  # no heading: one is added
    out = tmp_path / "RESULTS.md"
    assert load_report().main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert text.startswith("# kdcache benchmark results")
    assert f"| cores | {os.cpu_count()} |" in text
    for fact in (
        "| CPU |",
        "| RAM |",
        "| torch |",
        "| zarr |",
        "| pyarrow |",
        "| assembled (UTC) |",
    ):
        assert fact in text
    assert (
        text.index("## a_loader")
        < text.index("## Store size")
        < text.index("source: `bench/b_store.py`")
    )
    assert "| 64 | 190 |" in text


def test_a_section_written_with_options_names_its_command(tmp_path: Path) -> None:
    results = tmp_path / "results"
    results.mkdir()
    head = "## Fidelity (`bench/fidelity.py`)\n\n"
    (results / "fidelity_codec.md").write_text(
        head + "Command: `python bench/fidelity.py --codec-twins`. Machine: x.\n"
    )
    (results / "fidelity.md").write_text(head + "Machine: x.\n")
    out = tmp_path / "RESULTS.md"
    assert load_report().main(["--results", str(results), "--out", str(out)]) == 0
    text = out.read_text()
    assert "source: `bench/fidelity.py`</sub>" in text
    assert "source: `python bench/fidelity.py --codec-twins`</sub>" in text


def test_missing_results_directory_is_exit_2(tmp_path: Path) -> None:
    assert (
        load_report().main(["--results", str(tmp_path / "none"), "--out", str(tmp_path / "R.md")])
        == 2
    )
    assert not (tmp_path / "R.md").exists()


def test_a_section_without_a_command_names_the_script_that_wrote_it() -> None:
    report = load_report()
    for stem, script in [
        ("fidelity_chat", "bench/fidelity.py"),  # bench/fidelity.py --corpus stdlib-chat
        ("cache_overhead_1_threads", "bench/cache_overhead.py"),
        ("offload", "bench/offload.py"),
    ]:
        assert report.source_of(Path(f"{stem}.md"), "## a section\n") == f"`{script}`"
