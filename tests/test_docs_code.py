"""Every code block of the README and of the docs runs here, or says on the line above it what
it needs (``<!-- needs: gpu -->``, ``cluster``, ``network``, ``minutes``) and is checked
without running: syntax, and every ``kdcache`` command, option and ``make`` target or variable
against the real CLI and Makefile (tests/doc_blocks.py reads the pages). The ``minutes`` blocks
then run in tests/test_docs_minutes.py (``make test-minutes``).

Python blocks run page by page, in order, in one namespace, in a folder whose ``artifacts/``
holds the stores the pages name (docs/training-stack.md's run in tests/test_docs_examples.py).
"""

from __future__ import annotations

import ast
import os
import re
import shlex
import subprocess
from pathlib import Path

import click
import pytest
import yaml
from conftest import write_synthetic_store
from doc_blocks import LANGUAGES, NEEDS, ROOT, Block, all_blocks, inline_code, pages, shell_commands

BLOCKS = all_blocks()
SUBPROCESS_PAGES = {"docs/training-stack.md"}  # tests/test_docs_examples.py
CODE = {"python", "bash", "yaml"}
# `kdcache NAME ...`, or a launcher's `-m kdcache.pipeline NAME ...`
KDCACHE = re.compile(r"(?:^|[\s/])(?:kdcache|-m kdcache\.pipeline)\s+([a-z][a-z-]+)(.*)")
# `make WORDS` up to a redirection, pipe or next command
MAKE = re.compile(r"make ([^>|;&]*)")
LENGTHS = {"train": [[24] * 6, [24] * 5], "eval": [[24] * 4, [24] * 3 + [11]]}


def _name(block: Block) -> str:
    return f"{block.page}:{block.line}"


def test_every_block_says_its_language_and_marks_only_known_needs() -> None:
    assert len(BLOCKS) > 20 and any(block.needs for block in BLOCKS)
    for block in BLOCKS:
        assert block.language in LANGUAGES, f"{block}: give the block one of {sorted(LANGUAGES)}"
        assert block.needs <= NEEDS, f"{block}: unknown needs {sorted(block.needs - NEEDS)}"
        if block.language == "bash":
            # the suite runs no shell: a shell block says what keeps it out of the suite
            assert block.needs, (
                f"{block}: mark what it needs (<!-- needs: ... -->) or make it Python"
            )


def test_marked_blocks_are_valid_code() -> None:
    for block in BLOCKS:
        if block.language == "python":
            ast.parse(block.code, filename=str(block))
        elif block.language == "bash":
            syntax = subprocess.run(
                ["bash", "-n"], input=block.code, text=True, capture_output=True
            )
            assert syntax.returncode == 0, f"{block}: {syntax.stderr}"
        elif block.language == "yaml":
            yaml.safe_load(block.code)


def _commands() -> list[tuple[str, str]]:
    """(where, command line) of every shell line, `$ ` text line and inline span of the pages."""
    found = []
    for block in BLOCKS:
        if block.language == "bash":
            found += [(str(block), line) for line in shell_commands(block.code)]
        elif block.language == "text":
            lines = block.code.splitlines()
            found += [(str(block), line[2:]) for line in lines if line.startswith("$ ")]
    for page in pages():
        found += [(str(page.relative_to(ROOT)), span) for span in inline_code(page)]
    return found


def _check_kdcache(where: str, name: str, rest: str) -> None:
    from kdcache.pipeline.cli import cli

    ctx = click.Context(cli)
    assert name in cli.list_commands(ctx), f"{where}: `kdcache {name}` does not exist"
    command = cli.get_command(ctx, name)
    assert command is not None
    options = {opt for param in command.params for opt in getattr(param, "opts", [])}
    for flag in re.findall(r"(?<![\w-])(--[a-z][a-z0-9-]*)", rest):
        assert flag in options | {"--help"}, f"{where}: `kdcache {name} {flag}`: no such option"


def test_every_kdcache_command_and_option_exists() -> None:
    checked = 0
    for where, line in _commands():
        if match := KDCACHE.search(line):
            _check_kdcache(where, *match.groups())
            checked += 1
    assert checked >= 30  # the guides' examples and the prose's spans


def _makefile() -> tuple[set[str], set[str]]:
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    targets = set(re.findall(r"^([a-z][a-z-]*):", makefile, flags=re.MULTILINE))
    variables = set(re.findall(r"^([A-Z_]+) \?=", makefile, flags=re.MULTILINE))
    return targets, variables


def test_every_make_target_and_variable_exists_and_expands_to_valid_commands(
    tmp_path: Path,
) -> None:
    targets, variables = _makefile()
    invocations = [(w, m[1]) for w, line in _commands() if (m := MAKE.match(line))]
    assert len(invocations) >= 10
    for where, invocation in invocations:
        words = shlex.split(invocation)
        for word in words:
            if word.startswith("-"):  # make's own options (make -n)
                continue
            if "=" in word:
                assert word.split("=")[0] in variables, f"{where}: unknown make variable {word}"
            else:
                assert word in targets, f"{where}: `make {word}`: no such target"
    # what the shell blocks' make lines run: every kdcache command they expand to is valid
    lines = [(where, invocation) for where, invocation in invocations if ".md:" in where]
    expanded = 0
    for where, invocation in lines:
        dry = subprocess.run(
            ["make", "--no-print-directory", "-n", "-C", str(ROOT), *shlex.split(invocation)],
            capture_output=True, text=True, env={**os.environ, "MAKEFLAGS": ""},
        )  # fmt: skip
        assert dry.returncode == 0, f"{where}: make -n {invocation}: {dry.stderr}"
        for command in dry.stdout.splitlines():
            if match := re.search(r"/kdcache\s+([a-z][a-z-]+)(.*)", command):
                _check_kdcache(f"{where} (make -n {invocation})", *match.groups())
                expanded += 1
    assert expanded >= 5


def test_the_sweep_yamls_of_the_docs_are_valid_sweeps(tmp_path: Path) -> None:
    from kdcache.pipeline.search.sweep_config import load_sweep_config

    blocks = [b for b in BLOCKS if b.language == "yaml"]
    configs = []
    for i, block in enumerate(blocks):
        path = tmp_path / f"sweep-{i}.yaml"
        path.write_text(block.code)
        configs.append(load_sweep_config(path))
    assert len(configs[0].candidates) == 6 + 1  # the 3 x 2 grid and the CE-only baseline
    searched = [c for c in configs if c.strategy.sampler != "grid"]
    assert searched and all(c.space for c in searched)  # the strategy examples draw from ranges


@pytest.fixture(scope="module")
def docs_folder(tmp_path_factory: pytest.TempPathFactory, tiny_tokenizer_dir: Path) -> Path:
    """A folder with the stores the pages' Python names in artifacts/."""
    folder = tmp_path_factory.mktemp("docs")
    stores = {
        "store": {"targets": "topk+sampled", "codec": "raw", "loss_mask": True},
        "store-arrow": {"targets": "topk+sampled", "codec": "raw", "loss_mask": True},
        "store-k64": {"targets": "topk", "codec": "gaps", "top_k": 64},
        "store-k64-arrow": {"targets": "topk", "codec": "gaps", "top_k": 64},
    }
    for name, options in stores.items():
        backend = "arrow" if name.endswith("arrow") else "zarr"
        url = str(folder / "artifacts" / name)
        write_synthetic_store(
            url, lengths=LENGTHS, backend=backend, tokenizer_dir=tiny_tokenizer_dir, **options
        )
    return folder


RUN = sorted({b.page for b in BLOCKS if b.language == "python" and not b.needs} - SUBPROCESS_PAGES)


@pytest.mark.parametrize("page", RUN)
def test_the_python_of_every_page_runs(
    page: str, docs_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(docs_folder)
    scope: dict[str, object] = {"__name__": "__docs__"}
    for block in [b for b in BLOCKS if b.page == page and b.language == "python" and not b.needs]:
        exec(compile(block.code, str(block), "exec"), scope)


def test_the_store_format_recipes_decode_what_open_store_reads(
    docs_folder: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import numpy as np

    from kdcache.storage import open_store

    monkeypatch.chdir(docs_folder)
    page = "docs/reference/store-format.md"
    recipes = [b for b in BLOCKS if b.page == page and b.language == "python"]
    names = ["store", "store-arrow", "store-k64", "store-k64-arrow"]
    assert len(recipes) == len(names)
    scope: dict[str, object] = {}
    for block, name in zip(recipes, names, strict=True):
        exec(compile(block.code, str(block), "exec"), scope)
        assert scope["store"] == f"artifacts/{name}", f"{block} reads another store"
        arrays = open_store(f"artifacts/{name}").read_shard("train-00000")
        got = {key: np.asarray(scope[key]) for key in ("ids", "logprobs", "tail") if key in scope}
        got |= {
            key: np.asarray(scope[key]) for key in ("tokens", "trained", "rows", "ids_t", "p_t")
        }
        if name == "store":  # raw Zarr, top-k + samples + loss mask
            np.testing.assert_array_equal(got["tokens"], arrays.tokens)
            np.testing.assert_array_equal(got["ids"], arrays.topk_ids)
            np.testing.assert_array_equal(got["logprobs"], arrays.topk_logprobs)
            np.testing.assert_array_equal(got["trained"], arrays.trained_positions)
            np.testing.assert_array_equal(got["rows"], arrays.target_offsets)
            distinct = int(arrays.sampled_distinct[0])
            np.testing.assert_array_equal(got["ids_t"], arrays.sampled_ids[:distinct])
            assert got["p_t"].sum() == pytest.approx(1.0)
        elif name == "store-arrow":  # one row per sequence
            table = scope["table"]
            assert table.num_rows == len(arrays.seq_offsets) - 1  # type: ignore[attr-defined]
        else:  # gaps: the numpy decoding is the reader's, value for value
            np.testing.assert_array_equal(got["ids"], arrays.topk_ids)
            np.testing.assert_array_equal(got["logprobs"], arrays.topk_logprobs.astype(np.float64))
            if name == "store-k64":
                tail = arrays.topk_tail_logprob.astype(np.float64)
                np.testing.assert_array_equal(got["tail"], tail)
