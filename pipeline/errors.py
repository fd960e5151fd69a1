"""The user-facing error of the CLI: one line, exit code 2, no traceback."""

from __future__ import annotations

import click


class UserError(click.ClickException):
    """A user mistake (bad path, bad option, incompatible input).

    The message should read ``<what>, <the value>, <what to do>``; the CLI prints it as
    ``Error: <message>`` and exits with code 2.
    """

    exit_code = 2
