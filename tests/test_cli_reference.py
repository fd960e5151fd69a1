"""docs/reference/cli.md's CLI reference is the real ``--help`` output of every command.

Regenerate it after changing an option: ``make cli-reference`` (runs this file with
``--write``). That every command, option and make target the pages mention exists is
tests/test_docs_code.py's.
"""

from __future__ import annotations

import sys
from pathlib import Path

import click
from doc_blocks import BEGIN, END

ROOT = Path(__file__).resolve().parents[1]
PAGE = ROOT / "docs" / "reference" / "cli.md"
WIDTH = 100  # help is rendered at a fixed width so the text does not depend on the terminal


def _help(args: list[str]) -> str:
    from click.testing import CliRunner

    from kdcache.pipeline.cli import cli

    result = CliRunner().invoke(
        cli, [*args, "--help"], prog_name="kdcache", terminal_width=WIDTH, max_content_width=WIDTH
    )
    assert result.exit_code == 0, result.output
    return result.output.rstrip() + "\n"


def available_commands() -> list[str]:
    """The sub-commands that are built (the lazy group lists planned ones that may not import)."""
    from kdcache.pipeline.cli import cli

    ctx = click.Context(cli)
    return [name for name in cli.list_commands(ctx) if cli.get_command(ctx, name) is not None]


def generate_reference() -> str:
    """The CLI reference section: ``kdcache --help`` then each sub-command's ``--help``."""
    parts = [BEGIN, "", "```text", "$ kdcache --help", _help([]).rstrip(), "```"]
    for name in available_commands():
        parts += ["", f"## `kdcache {name}`", "", "```text", f"$ kdcache {name} --help"]
        parts += [_help([name]).rstrip(), "```"]
    return "\n".join([*parts, "", END])


def current_reference(text: str) -> str:
    start, stop = text.find(BEGIN), text.find(END)
    assert start >= 0 and stop > start, f"{PAGE} lacks the {BEGIN!r} ... {END!r} markers"
    return text[start : stop + len(END)]


def write_reference() -> bool:
    """Rewrite the generated section in place; True when it changed."""
    text = PAGE.read_text(encoding="utf-8")
    new = text.replace(current_reference(text), generate_reference())
    if new != text:
        PAGE.write_text(new, encoding="utf-8")
    return new != text


def test_cli_reference_matches_help_output() -> None:
    text = PAGE.read_text(encoding="utf-8")
    assert current_reference(text) == generate_reference(), (
        f"{PAGE.relative_to(ROOT)}'s CLI reference is out of date: run `make cli-reference`"
    )


if __name__ == "__main__":
    if sys.argv[1:] == ["--write"]:
        changed = write_reference()
        print(
            f"{PAGE.relative_to(ROOT)} CLI reference "
            + ("regenerated" if changed else "already up to date")
        )
    else:
        print(generate_reference())
