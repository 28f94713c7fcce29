"""Logging to stderr (rich), with the CLI's -v/-q verbosity. stdout is kept for results.

Progress is reported through :func:`make_progress`. What it reports to is chosen per call of a
verb (its configuration's ``progress`` field, applied by :func:`reports_progress`): ``True``, a
rich bar on stderr (unless ``-q``); ``False``, nothing; a callable, called as
``callback(ProgressEvent)`` on every update, for notebooks, services and GUIs.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Self

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
    # GDAL's and PROJ's own messages (rasterio and pyproj log them) likewise: without a handler
    # Python's last-resort one would print them raw next to the error line.
    logging.captureWarnings(True)
    for name in LIBRARY_LOGGERS:
        library = logging.getLogger(name)
        library.handlers = list(logger.handlers)
        library.propagate = False
        library.setLevel(logging.WARNING if verbosity > 0 else logging.CRITICAL + 1)


# Python warnings, GDAL's messages (through rasterio's CPLError handler), PROJ's (pyproj).
LIBRARY_LOGGERS = ("py.warnings", "rasterio", "pyproj")


@contextlib.contextmanager
def library_messages_logged():
    """Run a verb inside one ``rasterio.Env``: GDAL's error handler is then rasterio's, which
    logs GDAL and PROJ messages (``ERROR 1: PROJ: ... crs not found``) to the ``rasterio``
    logger. Outside an Env (a CRS parsed before any file is opened) GDAL's default handler
    writes them raw to stderr."""
    import rasterio

    with rasterio.Env():
        yield


@contextlib.contextmanager
def library_warnings_quiet(name: str):
    """A library's own warnings (huggingface_hub's download retries, one line a second while
    offline) shown only with -v: the one-line error that follows says what failed."""
    library = logging.getLogger(name)
    level = library.level
    if verbosity() <= 0:
        library.setLevel(logging.ERROR)
    try:
        yield
    finally:
        library.setLevel(level)


def verbosity() -> int:
    return _state["verbosity"]


def progress_enabled() -> bool:
    return _state["verbosity"] >= 0


@dataclass(frozen=True)
class ProgressEvent:
    """One progress update: ``completed`` of ``total`` units (None: unknown) of ``description``
    ("adapt (dinov2)", "predict region.tif"); ``info`` is the bar's text (losses, say)."""

    description: str
    completed: float
    total: float | None
    info: str = ""


ProgressCallback = Callable[[ProgressEvent], Any]
Progress = bool | ProgressCallback  # what a verb's ``progress`` field holds
_progress: contextvars.ContextVar[Progress] = contextvars.ContextVar("progress", default=True)


def reports_progress(verb):
    """Decorates a verb ``fn(cfg)``: its progress goes where ``cfg.progress`` says."""

    @functools.wraps(verb)
    def run(cfg, *args, **kwargs):
        token = _progress.set(getattr(cfg, "progress", True))
        try:
            return verb(cfg, *args, **kwargs)
        finally:
            _progress.reset(token)

    return run


class _Width:
    width = 80


class CallbackProgress:
    """The part of rich's ``Progress`` the library uses, reporting to a callback."""

    console = _Width()

    def __init__(self, callback: ProgressCallback):
        self._callback = callback
        self._tasks: dict[int, dict] = {}

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc) -> None:
        return None

    def start(self) -> None:
        return None

    def stop(self) -> None:
        return None

    def add_task(
        self, description: str, total: float | None = None, info: str = "", **_fields
    ) -> int:
        task_id = len(self._tasks)
        self._tasks[task_id] = {
            "description": description,
            "completed": 0,
            "total": total,
            "info": info,
        }
        self._emit(task_id)
        return task_id

    def update(
        self,
        task_id: int,
        *,
        completed: float | None = None,
        advance: float | None = None,
        total: float | None = None,
        description: str | None = None,
        info: str | None = None,
        **_fields,
    ) -> None:
        task = self._tasks[task_id]
        if completed is not None:
            task["completed"] = completed
        if advance is not None:
            task["completed"] += advance
        for key, value in (("total", total), ("description", description), ("info", info)):
            if value is not None:
                task[key] = value
        self._emit(task_id)

    def advance(self, task_id: int, advance: float = 1) -> None:
        self.update(task_id, advance=advance)

    def _emit(self, task_id: int) -> None:
        self._callback(ProgressEvent(**self._tasks[task_id]))


def make_progress(transient: bool = False):
    """Where the running verb reports progress: a rich bar on stderr with rate and ETA
    (disabled by -q or ``progress=False``), or a :class:`CallbackProgress`."""
    target = _progress.get()
    if callable(target):
        return CallbackProgress(target)
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
        TextColumn(
            "[bold]{task.description}",
            table_column=Column(no_wrap=True, overflow="ellipsis", max_width=28),
        ),
        BarColumn(bar_width=24),
        MofNCompleteColumn(),
        TaskProgressColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
        TextColumn(
            "{task.fields[info]}", table_column=Column(no_wrap=True, overflow="ellipsis", ratio=1)
        ),
        console=stderr,
        disable=not (target and progress_enabled()),
        transient=transient,
    )
