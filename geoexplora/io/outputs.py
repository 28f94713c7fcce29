"""Output safety: overwrite guard and atomic writes (temporary name, rename when complete)."""

from __future__ import annotations

import contextlib
import os
import shutil
import uuid
from pathlib import Path

from geoexplora.errors import UserError, opt


def check_output(path: str | os.PathLike, overwrite: bool, option: str = "output") -> Path:
    """Refuse an existing output unless ``overwrite``; the parent folder must be writable.
    ``option``: the configuration field that named the path (for messages)."""
    path = Path(path)
    if path.exists() and not overwrite:
        raise UserError(f"{path} exists; pass {opt('overwrite')} to replace it")
    if path.exists() and Path.cwd().resolve().is_relative_to(path.resolve()):
        raise UserError(
            f"{opt(option)} {path}: holds the current folder, and is replaced by a "
            "new folder when the run completes; run from another folder"
        )
    parent = path.parent if str(path.parent) else Path(".")
    if parent.exists() and not parent.is_dir():
        raise UserError(f"{opt(option)} {path}: {parent} is not a folder")
    if parent.exists() and not os.access(parent, os.W_OK):
        raise UserError(f"{opt(option)} {path}: folder {parent} is not writable")
    return path


def check_not_input(outputs, inputs, option: str = "output") -> None:
    """Refuse a run whose output (or a file it writes beside it: sidecar, checkpoint, log...)
    is one of its inputs, or a folder holding one: the atomic replace would destroy the input
    once the run completes. Paths are compared resolved (links followed) and, where both exist,
    by device and inode (hard links)."""
    from geoexplora.io.remote import is_uri

    # Remote inputs (URIs) and parsed STAC items cannot be an output: outputs are local files.
    ins = [
        (Path(p), Path(p).resolve())
        for p in inputs
        if p is not None and not isinstance(p, dict) and not is_uri(p) and str(p)
    ]
    for out in outputs:
        if out is None:
            continue
        out = Path(out)
        target = out.resolve()
        for given, resolved in ins:
            same = target == resolved or (
                target.exists() and resolved.exists() and os.path.samefile(target, resolved)
            )
            if same:
                raise UserError(
                    f"{opt(option)} {out} is the input {given}; writing it would "
                    "destroy the input: choose another output path"
                )
            if resolved.is_relative_to(target):
                raise UserError(
                    f"{opt(option)} {out} holds the input {given}; replacing it "
                    "would destroy the input: choose another output path"
                )


def temporary_sibling(path: Path) -> Path:
    """A hidden name next to ``path`` (same filesystem, so the final rename is atomic)."""
    return path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.partial")


@contextlib.contextmanager
def atomic_output(
    path: str | os.PathLike,
    overwrite: bool = False,
    appeared_hint: str = "pass --overwrite to replace it",
):
    """Yield a temporary path; on success move it to ``path``, on failure remove it.

    Works for files and folders. An existing ``path`` is only replaced once the new output is
    complete, so an interrupted run never leaves a half-written output under the final name. A
    link to a folder stays a link: the folder it names is replaced.
    """
    path = Path(path)
    if path.is_symlink() and path.is_dir():
        path = path.resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_sibling(path)
    try:
        yield tmp
    except BaseException:
        _remove(tmp)
        raise
    if path.exists():
        if not overwrite:
            _remove(tmp)
            raise UserError(f"{path} appeared while writing (another run?); {appeared_hint}")
        if path.is_dir() and not path.is_symlink():
            old = temporary_sibling(path)
            os.replace(path, old)
            os.replace(tmp, path)
            _remove(old)
            return
    os.replace(tmp, path)


@contextlib.contextmanager
def exclusive(path: str | os.PathLike):
    """Hold an exclusive lock on ``path``'s folder while a run rewrites ``path`` from its old
    content (``tile --append``): concurrent runs wait for each other instead of the last one
    undoing the others' work. Only runs of this program that take the lock wait."""
    import fcntl
    import logging

    parent = Path(path).resolve().parent
    if not parent.is_dir():
        yield
        return
    fd = os.open(parent, os.O_RDONLY)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            logging.getLogger("geoexplora").warning(
                "%s: another run is writing in %s; waiting for it", path, parent
            )
            fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # releases the lock


def _remove(p: Path) -> None:
    if p.is_dir() and not p.is_symlink():
        shutil.rmtree(p, ignore_errors=False)
    elif p.exists() or p.is_symlink():
        p.unlink()


@contextlib.contextmanager
def disk_full_as_oserror(path: Path, needed_bytes: int):
    """GDAL reports a write that failed for want of space as a ``RasterioIOError`` without an
    errno (libtiff's "No space left on device" is only a log line). When the file system of
    ``path`` has less than ``needed_bytes`` free after such a failure, it is re-raised as
    ``OSError(ENOSPC)`` naming ``path``, which the CLI reports as one line; any other failure
    propagates as it is."""
    import errno

    from rasterio.errors import RasterioIOError

    try:
        yield
    except RasterioIOError as exc:
        if shutil.disk_usage(Path(path).parent).free >= needed_bytes:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc


def save_npy(path: Path, array) -> None:
    """``numpy.save`` (no pickles), with a full disk reported as ``OSError(ENOSPC)`` naming
    ``path``: numpy's writer raises a bare ``OSError("N requested and M written")`` without an
    errno when the disk fills."""
    import errno

    import numpy as np

    try:
        np.save(path, array, allow_pickle=False)
    except OSError as exc:
        if exc.errno is not None or shutil.disk_usage(Path(path).parent).free >= array.nbytes:
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc


def _tensor_bytes(obj) -> int:
    """Bytes of the tensors inside ``obj`` (nested dicts, lists and tuples)."""
    if hasattr(obj, "element_size") and hasattr(obj, "numel"):
        return obj.element_size() * obj.numel()
    if isinstance(obj, dict):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def torch_save(obj, path: Path) -> None:
    """``torch.save``, with a full disk reported as ``OSError(ENOSPC)`` naming ``path``: torch's
    writer raises a bare RuntimeError ("basic_ios::clear: iostream error", "unexpected pos")
    when the disk fills. It counts as a full disk when the file system has less room left than
    the tensors being written."""
    import errno

    import torch

    try:
        torch.save(obj, path)
    except RuntimeError as exc:
        if shutil.disk_usage(Path(path).parent).free >= max(_tensor_bytes(obj), 1):
            raise
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path)) from exc
