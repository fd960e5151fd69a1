"""Progress that reads well in a terminal and in a log file.

On a terminal, ``progress(...)`` is an ordinary tqdm bar (redrawn in place with carriage
returns). When the stream is not a terminal (``make cache-teacher > log 2>&1``, a batch job, a
pipe), redrawing a bar frame per batch would fill the log with thousands of frames; instead the
same facts — done/total, percentage, elapsed, rate, ETA and the postfix — are printed as one
plain line at most every ``KDCACHE_PROGRESS_SECONDS`` seconds (default 5), plus a final line
when the bar closes (bars made with ``leave=False`` vanish on a terminal and print no final
line). A plain line has no carriage return and no ANSI escape, e.g.::

    cache-teacher:  45% 1.20M/2.65M [00:12<00:15, 98.1ktok/s, shards=3]
"""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterable
from typing import Any, TextIO

from tqdm import tqdm

from kdcache.pipeline.errors import UserError

INTERVAL_ENV = "KDCACHE_PROGRESS_SECONDS"
DEFAULT_INTERVAL = 5.0


def line_interval() -> float:
    """Seconds between two plain progress lines (``KDCACHE_PROGRESS_SECONDS``, default 5)."""
    raw = os.environ.get(INTERVAL_ENV, "").strip()
    if not raw:
        return DEFAULT_INTERVAL
    try:
        seconds = float(raw)
    except ValueError:
        seconds = -1.0
    if not 0 <= seconds < float("inf"):
        raise UserError(
            f"{INTERVAL_ENV} must be a number of seconds >= 0, {raw!r}, set it to e.g. 5 or "
            "unset it"
        )
    return seconds


def is_terminal(stream: TextIO) -> bool:
    """True when ``stream`` is an interactive terminal (a closed or odd stream is not)."""
    try:
        return bool(stream.isatty())
    except (AttributeError, ValueError, OSError):
        return False


class PlainProgress(tqdm):
    """A tqdm whose every display is one full line, printed at most every ``interval`` seconds.

    tqdm's bookkeeping (counts, rate, postfix, ETA) is kept; only the output changes: tqdm
    refreshes on ``update`` (throttled by ``mininterval``) and on every ``set_postfix`` (not
    throttled), so the throttle lives in ``display``.
    """

    def __init__(self, *args: Any, interval: float, **kwargs: Any) -> None:
        self._interval = interval
        # no line for tqdm's initial refresh: the first one comes after ``interval`` seconds
        self._last_line = time.monotonic()
        kwargs.update(dynamic_ncols=False, ncols=0, ascii=True, mininterval=interval)
        super().__init__(*args, **kwargs)

    def _write_line(self) -> None:
        # ncols=0: tqdm's "statistics only" layout, no bar characters and no trimming
        facts = {**self.format_dict, "ncols": 0, "colour": None}
        self.fp.write(self.format_meter(**facts) + "\n")
        getattr(self.fp, "flush", lambda: None)()
        self._last_line = time.monotonic()

    def display(self, msg: str | None = None, pos: int | None = None) -> bool:
        if msg == "":  # tqdm clearing its line: nothing to clear in a log
            return True
        if time.monotonic() - self._last_line >= self._interval:
            self._write_line()
        return True

    def close(self) -> None:
        if getattr(self, "disable", True):
            return
        leave = self.leave is None or self.leave
        if leave and hasattr(self, "start_t") and not getattr(self.fp, "closed", False):
            self._ema_dt = lambda: None  # the final line shows the average rate, as tqdm does
            self._write_line()
        self.disable = True
        self._decr_instances(self)


def prepare_for_logs() -> None:
    """What ``kdcache`` does first when stderr is not a terminal (nothing on a terminal): check
    ``KDCACHE_PROGRESS_SECONDS`` (a typo fails now, not after a model has loaded), and turn off
    Hugging Face's own bars (hub downloads, transformers' "Writing model shards"), which would
    write a frame per update into the log — unless ``HF_HUB_DISABLE_PROGRESS_BARS`` is set."""
    if is_terminal(sys.stderr):
        return
    line_interval()
    if "HF_HUB_DISABLE_PROGRESS_BARS" in os.environ:
        return
    os.environ["HF_HUB_DISABLE_PROGRESS_BARS"] = "1"  # read when huggingface_hub is imported
    # already imported (an in-process caller such as the tests): tell them directly
    transformers_logging = sys.modules.get("transformers.utils.logging")
    hub_utils = sys.modules.get("huggingface_hub.utils")
    if transformers_logging is not None:
        transformers_logging.disable_progress_bar()  # its own switch and the hub's
    elif hub_utils is not None:
        hub_utils.disable_progress_bars()


def progress(iterable: Iterable[Any] | None = None, **kwargs: Any) -> tqdm:
    """A progress bar: tqdm's arguments (``total``, ``desc``, ``unit``, ``disable``, ...).

    On a terminal: ``tqdm.auto.tqdm`` as given. Otherwise (stderr redirected to a file or a
    pipe): a ``PlainProgress`` printing a plain line every ``KDCACHE_PROGRESS_SECONDS`` seconds
    and a final one. Either way the result is used like any tqdm (``update``, ``set_postfix``,
    ``total``, ``close``, iteration, ``with``).
    """
    stream = kwargs.get("file") or sys.stderr
    if kwargs.get("disable") or is_terminal(stream):
        from tqdm.auto import tqdm as terminal_tqdm  # imported when used: it pulls in asyncio

        return terminal_tqdm(iterable, **kwargs)
    return PlainProgress(iterable, interval=line_interval(), **kwargs)
