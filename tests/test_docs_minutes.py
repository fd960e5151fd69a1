"""The blocks of the docs that take minutes, run as a reader runs them, and the claims they make.

A shell block marked ``<!-- needs: minutes -->`` (tests/doc_blocks.py) is checked without
running by ``make test`` (tests/test_docs_code.py). Here every one of them runs, command by
command, in a copy of the repository (its tracked files) with this venv on ``PATH`` and as the
Makefile's ``VENV``: the README's quickstart, then every page that has one, each page's blocks
in order (its unmarked Python blocks too: they set up what its shell lines use). A command
already run in that copy is not run again (getting-started repeats the README's quickstart).

Checked after each command: exit status 0, and every ``--out`` it names exists. After the
quickstart and after the chat demo: the KD student's eval cross-entropy is below its CE-only
twin's (the stable claim; the figures themselves differ slightly from CPU to CPU).

About 25 minutes on 2 cores, so outside ``make test``: ``make test-minutes`` runs it, and CI
after the suite.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from doc_blocks import ROOT, Block, all_blocks, shell_commands

pytestmark = pytest.mark.minutes

# commands a block shows that this test does not run, and where they do run
RUN_ELSEWHERE = {"make test": "CI's own step (.ci/run), the suite this test is part of"}
FIRST, LAST = ("README.md", "docs/getting-started.md"), "docs/guides/chat-data.md"
TIMEOUT = 1500  # s, for one command
BLOCKS = all_blocks()
MINUTES = sorted({b.page for b in BLOCKS if "minutes" in b.needs})
# the quickstart first; the chat demo last, since it changes the store make reads next
ORDER = [
    *[p for p in FIRST if p in MINUTES],
    *[p for p in MINUTES if p not in (*FIRST, LAST)],
    *[p for p in (LAST,) if p in MINUTES],
]


class Workspace:
    """A copy of the repository's tracked files where the pages' commands run, in order."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self.done: set[str] = set()
        self.log = folder / "commands.log"
        venv_bin = str(Path(sys.prefix) / "bin")
        self.env = {
            **os.environ,
            "PATH": f"{venv_bin}{os.pathsep}{os.environ.get('PATH', '')}",
            "VENV": sys.prefix,  # the Makefile's venv is this one: nothing is installed again
            "MAKEFLAGS": "",
        }

    def run(self, command: str, where: Block) -> None:
        if command in self.done or command in RUN_ELSEWHERE:
            return
        start = time.monotonic()
        done = subprocess.run(
            ["bash", "-o", "pipefail", "-c", command], cwd=self.folder, env=self.env,
            capture_output=True, text=True, timeout=TIMEOUT,
        )  # fmt: skip
        seconds = time.monotonic() - start
        with self.log.open("a", encoding="utf-8") as log:
            log.write(f"{seconds:7.1f} s  exit {done.returncode}  {where}: {command}\n")
        assert done.returncode == 0, (
            f"{where}: `{command}` exited {done.returncode}\n{done.stdout[-2000:]}\n"
            f"{done.stderr[-3000:]}"
        )
        for out in _outputs(command):
            assert (self.folder / out).exists(), f"{where}: `{command}` wrote no {out}"
        self.done.add(command)

    def run_page(self, page: str) -> None:
        scope: dict[str, object] = {"__name__": "__docs__"}
        for block in [b for b in BLOCKS if b.page == page]:
            if block.language == "python" and not block.needs:
                cwd = Path.cwd()
                os.chdir(self.folder)
                try:
                    exec(compile(block.code, str(block), "exec"), scope)
                finally:
                    os.chdir(cwd)
            elif block.language == "bash" and block.needs == {"minutes"}:
                for command in shell_commands(block.code):
                    self.run(command, block)


def _outputs(command: str) -> list[str]:
    words = command.split()
    return [words[i + 1] for i, word in enumerate(words[:-1]) if word == "--out"]


def _copy_of_the_repository(folder: Path) -> None:
    listed = subprocess.run(
        ["git", "-C", str(ROOT), "ls-files", "-z"], capture_output=True, text=True, check=True
    )
    for name in filter(None, listed.stdout.split("\0")):
        source, target = ROOT / name, folder / name
        if source.is_file():  # a tracked file deleted in the work tree is not copied
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(source, target)  # mtimes kept: the venv's install stamp stays newer


def _installed_venv() -> None:
    """The Makefile reinstalls a venv older than pyproject.toml: in the copy, that would point
    this venv's editable install at the copy. So the venv must be up to date first."""
    stamp = Path(sys.prefix) / ".kdcache-installed"  # the Makefile's STAMP
    pyproject = ROOT / "pyproject.toml"
    if not stamp.is_file() or stamp.stat().st_mtime < pyproject.stat().st_mtime:
        pytest.fail(f"{sys.prefix} is not up to date with pyproject.toml: run `make test-minutes`")


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory) -> Workspace:
    _installed_venv()
    folder = tmp_path_factory.mktemp("reader")
    _copy_of_the_repository(folder)
    return Workspace(folder)


def _kd_beats_ce(folder: Path, where: str) -> None:
    kd, ce = (json.loads((folder / "runs" / n / "metrics.json").read_text()) for n in ("kd", "ce"))
    kd_ce, ce_ce = kd["final"]["cross_entropy"], ce["final"]["cross_entropy"]
    assert kd_ce < ce_ce, f"{where}: KD {kd_ce:.4f} is not below CE-only {ce_ce:.4f}"


def test_every_page_with_a_minutes_block_is_in_the_run() -> None:
    assert "README.md" in ORDER and LAST in ORDER and len(ORDER) >= 5
    commands = [c for b in BLOCKS if "minutes" in b.needs for c in shell_commands(b.code)]
    assert all(b.needs == {"minutes"} for b in BLOCKS if "minutes" in b.needs), (
        "a block needing minutes and a GPU, a cluster or the network cannot run here"
    )
    assert set(RUN_ELSEWHERE) <= set(commands)


@pytest.mark.timeout(3 * TIMEOUT)
@pytest.mark.parametrize("page", ORDER)
def test_the_minutes_blocks_of_every_page_run(page: str, workspace: Workspace) -> None:
    workspace.run_page(page)
    if page in ("README.md", LAST):  # the quickstart's claim, and the chat demo's
        _kd_beats_ce(workspace.folder, page)
