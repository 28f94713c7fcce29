"""Logging to stderr (rich), with the CLI's -v/-q verbosity. stdout is kept for results."""

from __future__ import annotations

import logging

from rich.console import Console

stderr = Console(stderr=True)
logger = logging.getLogger("geoexplora")

_state = {"verbosity": 0}


def set_verbosity(verbosity: int) -> None:
    """-q -> -1 (errors only, no progress), 0 normal, 1+ -v (debug, tracebacks)."""
    _state["verbosity"] = verbosity
    level = logging.ERROR if verbosity < 0 else logging.DEBUG if verbosity > 0 else logging.INFO
    if not logger.handlers:
        from rich.logging import RichHandler

        handler = RichHandler(console=stderr, show_time=False, show_path=False, markup=False)
        logger.addHandler(handler)
        logger.propagate = False
    logger.setLevel(level)
    # Python warnings of the libraries (rasterio's NotGeoreferencedWarning, torch's pickle
    # notes...) go through the same handler and only with -v: without it, an error stays the
    # one line on stderr. The project's own warnings are logger.warning calls, shown as usual.
    logging.captureWarnings(True)
    library = logging.getLogger("py.warnings")
    library.handlers = list(logger.handlers)
    library.propagate = False
    library.setLevel(logging.WARNING if verbosity > 0 else logging.CRITICAL + 1)


def verbosity() -> int:
    return _state["verbosity"]


def progress_enabled() -> bool:
    return _state["verbosity"] >= 0


def make_progress(transient: bool = False):
    """A rich progress bar on stderr with rate and ETA; disabled by -q."""
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.table import Column

    # The bar, counts and times keep their width; a long description or info text (loss terms)
    # is cut with an ellipsis rather than squeezing the bar out of an 80-column terminal.
    return Progress(
        TextColumn("[bold]{task.description}", table_column=Column(
            no_wrap=True, overflow="ellipsis", max_width=28)),
        BarColumn(bar_width=24), MofNCompleteColumn(), TaskProgressColumn(),
        TimeElapsedColumn(), TimeRemainingColumn(),
        TextColumn("{task.fields[info]}", table_column=Column(
            no_wrap=True, overflow="ellipsis", ratio=1)),
        console=stderr, disable=not progress_enabled(), transient=transient,
    )
