"""Errors the CLI turns into clean one-line messages.

``UserError`` is bad usage or bad input (exit code 2): the message names the file, band or option.
``RuntimeFailure`` is a failure of the run itself (exit code 1). Anything else is a bug and keeps
its traceback.

The library never spells CLI flags. An error about one option carries the option's name as data
(``UserError("must be at least 1", option="batch_size")``), and a message that mentions other
options marks them with :func:`opt`. ``str(error)`` names options as the Python API spells them
(``batch_size: must be at least 1``); the CLI renders the same error with its flags
(``--batch-size: must be at least 1``) through :meth:`UserError.render`.
"""

from __future__ import annotations

import re
from collections.abc import Callable

# Marks an option's name inside a message: rendered as the field name or as the CLI flag.
_MARK = re.compile("\u2039([A-Za-z0-9_]+)\u203a")


def opt(name: str) -> str:
    """An option's name inside a message (``f"use {opt('overlap')} 0"``), rendered per caller."""
    return f"\u2039{name}\u203a"


# Configuration fields whose CLI flag is not their name with dashes.
SHORT_FLAGS = {"creation_options": "--co"}


def cli_flag(name: str) -> str:
    """The CLI flag of a configuration field: ``batch_size`` -> ``--batch-size``."""
    return SHORT_FLAGS.get(name) or "--" + name.replace("_", "-")


def _render(template: str, option: str | None, name: Callable[[str], str]) -> str:
    text = _MARK.sub(lambda m: name(m.group(1)), template)
    return f"{name(option)}: {text}" if option else text


class UserError(Exception):
    """Bad input or usage; exit code 2. ``option``: the configuration field at fault, if one."""

    exit_code = 2

    def __init__(self, message: str = "", option: str | None = None):
        super().__init__(message)
        self.template = message
        self._prefixed = option is not None  # "option: message"
        first = _MARK.search(message)
        # The option at fault: as given, else the first one the message names.
        self.option = option if option is not None else (first.group(1) if first else None)

    def __reduce__(self):  # keeps ``option`` across processes (tile's workers)
        return _rebuild, (type(self), self.template, self.option if self._prefixed else None)

    def render(self, name: Callable[[str], str] = str) -> str:
        """The message with option names spelled by ``name`` (the CLI passes :func:`cli_flag`)."""
        return _render(self.template, self.option if self._prefixed else None, name)

    def __str__(self) -> str:
        return self.render()


def _rebuild(kind: type, template: str, option: str | None) -> UserError:
    return kind(template, option=option)


class RuntimeFailure(Exception):
    """The work could not be completed; exit code 1."""

    exit_code = 1

    def __init__(self, message: str = ""):
        super().__init__(message)
        self.template = message

    def render(self, name: Callable[[str], str] = str) -> str:
        return _render(self.template, None, name)

    def __str__(self) -> str:
        return self.render()


def raise_storage_failure(exc: OSError) -> None:
    """Re-raise a full or read-only disk met while writing as a RuntimeFailure (a failure of the
    run, not a bug: no traceback); any other OSError is re-raised as it is. The writers have
    removed their temporary files by then (``io.outputs.atomic_output``); what a resumable run
    keeps (predict's strips, adapt's and finetune's last checkpoint) stays for ``--resume``."""
    import errno

    reasons = {
        errno.ENOSPC: "no space left on device",
        errno.EDQUOT: "disk quota exceeded",
        errno.EROFS: "read-only file system",
    }
    reason = reasons.get(exc.errno)
    if reason is None:
        raise exc
    where = f"{exc.filename}: " if exc.filename else ""
    raise RuntimeFailure(
        f"{where}{reason}; free some space and run again (--resume continues "
        "an interrupted predict, embed, adapt or finetune)"
    ) from exc
