"""The resolved options of the verb the CLI is running, for the model files it writes.

The CLI sets it around a verb's run (``geoexplora.commands._options``); ``save_model`` records it
in the file's provenance, so a model file says how it was made even when its sidecar
``OUT-stem.config.yaml`` was lost. Library callers that set none get no ``config`` entry.
"""

from __future__ import annotations

import contextlib
from contextvars import ContextVar

_current: ContextVar[dict | None] = ContextVar("geoexplora_run_config", default=None)


@contextlib.contextmanager
def running_with(config: dict):
    """While the block runs, ``current()`` is ``config``."""
    token = _current.set(config)
    try:
        yield
    finally:
        _current.reset(token)


def current() -> dict | None:
    return _current.get()
