"""Checks the verbs' typed configurations run in ``__post_init__``, so a Python caller's mistake
is one clear :class:`~geoexplora.errors.UserError` naming the field, not a failure deep inside
the run (a path where a list is expected would be iterated character by character).
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import fields
from typing import Any, get_args

from geoexplora.errors import UserError


def path_list(name: str, value: Any) -> list:
    """``value`` as a list of paths or strings; a single path or string is refused."""
    if isinstance(value, (str, bytes, os.PathLike)):
        raise UserError(
            f"expects a list of inputs, not the single {value!r}: pass [{str(value)!r}]",
            option=name,
        )
    if not isinstance(value, Iterable):
        raise UserError(f"expects a list of inputs, not {type(value).__name__}", option=name)
    return list(value)


def one_of(name: str, value: Any, choices: Any, optional: bool = False) -> None:
    """``value`` must be one of a ``Literal``'s values (or of a tuple); None when optional."""
    allowed = get_args(choices) or tuple(choices)
    if value is None and optional:
        return
    if value not in allowed:
        raise UserError(
            f"must be one of {', '.join(map(str, allowed))}, not {value!r}", option=name
        )


def scene_options(name: str, value: Any):
    """``SceneOptions`` from None (defaults), a dict of its fields, or a ``SceneOptions``."""
    from geoexplora.io.scene import SceneOptions

    if value is None:
        return SceneOptions()
    if isinstance(value, SceneOptions):
        return value
    if isinstance(value, dict):
        known = {f.name for f in fields(SceneOptions)}
        unknown = sorted(set(value) - known)
        if unknown:
            raise UserError(
                f"unknown scene option(s) {', '.join(unknown)}; known: {', '.join(sorted(known))}",
                option=name,
            )
        return SceneOptions(**value)
    raise UserError(
        f"expects SceneOptions or a dict of its fields, not {type(value).__name__}", option=name
    )
