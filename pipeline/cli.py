"""The ``kdcache`` command line.

Sub-commands live next to the code they drive and are imported only when used, so that
``kdcache verify`` does not pay for importing torch and transformers.
"""

from __future__ import annotations

import importlib
import os
import re
import sys
from importlib.metadata import PackageNotFoundError, version

import click

from kdcache.pipeline.errors import UserError
from kdcache.pipeline.progress import prepare_for_logs
from kdcache.storage.errors import StoreError

# name -> "module:attribute" of a click.Command
COMMANDS: dict[str, str] = {
    "cache-teacher": "kdcache.pipeline.cache.cache_teacher:command",
    "train-student": "kdcache.pipeline.distill.train_student:command",
    "sweep": "kdcache.pipeline.search.sweep:command",
    "build-teacher": "kdcache.pipeline.cache.default_teacher:command",
    "compare": "kdcache.pipeline.distill.compare:command",
    "verify": "kdcache.pipeline.store_commands:verify",
    "inspect": "kdcache.pipeline.store_commands:inspect",
    "ls": "kdcache.pipeline.catalog:ls",
}

# the commands that run models; the store commands need neither torch nor transformers
MODEL_COMMANDS = ("cache-teacher", "train-student", "sweep", "build-teacher", "compare")
# pyproject.toml keeps torch>=2.4, but transformers (>=5.23, our floor) turns its PyTorch
# support off below 2.6: say so in one line instead of failing inside transformers
TORCH_FLOOR = (2, 6)


def check_torch() -> None:
    """Refuse, in one line, a torch that transformers will not use."""
    try:
        found = version("torch")
    except PackageNotFoundError as e:
        raise UserError(
            "torch is not installed, kdcache runs models with it, pip install 'torch>=2.6'"
        ) from e
    release = tuple(int(part) for part in re.findall(r"\d+", found)[:2])
    if release < TORCH_FLOOR:
        raise UserError(
            f"torch {'.'.join(map(str, TORCH_FLOOR))} or later is needed (transformers turns "
            f"PyTorch off below it), found torch {found}, pip install 'torch>=2.6'"
        )


class LazyGroup(click.Group):
    """A click group whose commands are imported on first use."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(set(super().list_commands(ctx)) | set(COMMANDS))

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        if cmd_name not in COMMANDS:
            return super().get_command(ctx, cmd_name)
        if cmd_name in MODEL_COMMANDS:
            check_torch()
        module_name, attribute = COMMANDS[cmd_name].split(":")
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name == module_name:  # that part of kdcache is not built yet
                return None
            raise
        command: click.Command = getattr(module, attribute)
        return command


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="kdcache")
def cli() -> None:
    """kdcache: cache a teacher's soft targets (top-k or samples) once, distill many students.

    Progress: a bar on a terminal; with stderr redirected to a file or a pipe, one plain line
    every KDCACHE_PROGRESS_SECONDS seconds (default 5) and a final one.
    """


INVOKED_WITH: list[str] = []  # the arguments of this invocation (after the program name)


def main(argv: list[str] | None = None) -> None:
    """Entry point: runs the CLI and turns every user mistake into one line and exit code 2."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    INVOKED_WITH[:] = list(sys.argv[1:] if argv is None else argv)  # sweep --parallel relaunches
    try:
        prepare_for_logs()  # in a log, only our progress lines (pipeline/progress.py)
        result = cli.main(args=argv, prog_name="kdcache", standalone_mode=False)
    except click.Abort:
        click.echo("Aborted.", err=True)
        sys.exit(130)
    except click.ClickException as e:
        # our UserError and click's own usage errors (bad option, missing argument): one line
        message = e.format_message()
        if isinstance(e, click.UsageError) and e.ctx is not None:
            message = f"{message} (see `{e.ctx.command_path} --help`)"
        click.echo(f"Error: {message}", err=True)
        sys.exit(2)
    except StoreError as e:
        click.echo(f"Error: {e}", err=True)
        sys.exit(2)
    except OSError as e:  # the machine, not the input: disk full, permissions, network
        click.echo(f"Error: {e}", err=True)
        sys.exit(1)
    except KeyboardInterrupt:
        click.echo("Interrupted.", err=True)
        sys.exit(130)
    # with standalone_mode=False click returns the exit code of ctx.exit(n) (e.g. verify's 1)
    if isinstance(result, int) and not isinstance(result, bool):
        sys.exit(result)
