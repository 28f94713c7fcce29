"""Shared fixtures: paths to the real data in ../shared/data (skip where absent) and the bundled
sample."""

from __future__ import annotations

import errno
import ipaddress
import os
import socket
from pathlib import Path

import pytest

# No test reaches the network: the Hugging Face hub is offline (read before huggingface_hub is
# imported, and inherited by the CLI subprocesses some tests start), and sockets may connect
# only to this machine (the tests' own loopback servers).
os.environ["HF_HUB_OFFLINE"] = "1"
_connect = socket.socket.connect


def _loopback_only(self, address):
    host = address[0] if isinstance(address, tuple) else None
    if self.family in (socket.AF_INET, socket.AF_INET6) and host is not None:
        try:
            local = ipaddress.ip_address(host.split("%")[0]).is_loopback
        except ValueError:
            local = host == "localhost"
        if not local:
            raise OSError(errno.ENETUNREACH, f"tests may not reach {host} (loopback only)")
    return _connect(self, address)


socket.socket.connect = _loopback_only  # type: ignore[method-assign]

ROOT = Path(__file__).resolve().parents[1]
SHARED_DATA = Path(os.environ.get("GEOEXPLORA_SHARED_DATA", ROOT.parent / "shared" / "data"))


@pytest.fixture(scope="session")
def shared_data() -> Path:
    if not SHARED_DATA.is_dir():
        pytest.skip(f"real test data not present at {SHARED_DATA} (the project's ../shared/data)")
    return SHARED_DATA


@pytest.fixture(scope="session")
def sample_data() -> Path:
    from geoexplora.sample import sample_dir

    return sample_dir()


def run_cli(*args: str, input: str | None = None):
    """Run the CLI in-process; returns (exit_code, stdout, stderr)."""
    import contextlib
    import io
    import sys

    from geoexplora.cli import main

    out, err = io.StringIO(), io.StringIO()
    old_stdin = sys.stdin
    try:
        if input is not None:
            sys.stdin = io.StringIO(input)
        with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
            code = main(list(args))
    finally:
        sys.stdin = old_stdin
    return code, out.getvalue(), err.getvalue()


@pytest.fixture
def interrupt_fifth_chip(monkeypatch):
    """Ctrl-C while tile writes its fifth chip."""
    from geoexplora.io import chips

    calls = []
    real_write = chips.write_chip

    def failing_write(*args, **kwargs):
        calls.append(1)
        if len(calls) == 5:
            raise KeyboardInterrupt
        real_write(*args, **kwargs)

    monkeypatch.setattr(chips, "write_chip", failing_write)


@pytest.fixture
def one_thread():
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
