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


def raise_storage_failure(exc: OSError) -> None:
    """Re-raise a full or read-only disk met while writing as a RuntimeFailure (a failure of the
    run, not a bug: no traceback); any other OSError is re-raised as it is. The writers have
    removed their temporary files by then (``io.outputs.atomic_output``); what a resumable run
    keeps (predict's strips, adapt's and finetune's last checkpoint) stays for ``--resume``."""
    import errno

    reasons = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
               errno.EROFS: "read-only file system"}
    reason = reasons.get(exc.errno)
    if reason is None:
        raise exc
    where = f"{exc.filename}: " if exc.filename else ""
    raise RuntimeFailure(f"{where}{reason}; free some space and run again (--resume continues "
                         "an interrupted predict, embed, adapt or finetune)") from exc
