"""Errors the CLI turns into clean one-line messages.

``UserError`` is bad usage or bad input (exit code 2): the message names the file, band or option.
``RuntimeFailure`` is a failure of the run itself (exit code 1). Anything else is a bug and keeps
its traceback.
"""


class UserError(Exception):
    """Bad input or usage; exit code 2."""

    exit_code = 2


class RuntimeFailure(Exception):
    """The work could not be completed; exit code 1."""

    exit_code = 1
