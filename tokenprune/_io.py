"""Writing files so that a reader (or a run stopped mid-write) never sees half of one."""

from __future__ import annotations

import contextlib
import os
import secrets
from pathlib import Path

__all__ = ["write_atomic"]


def write_atomic(path: str | Path, text: str | bytes) -> None:
    """Write via a temp file in the same folder and ``os.replace``: readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    # Created as open() creates a file, 0o666 less the umask (applied by the kernel), rather than
    # mkstemp's 0o600 fixed afterwards: reading the umask means setting it, which races with
    # other threads. O_EXCL on a random name makes the temp file ours alone, as mkstemp does.
    data = text if isinstance(text, bytes) else text.encode("utf-8")  # results hold Δ, ×, ²
    tmp = path.parent / f".{path.name}.{secrets.token_hex(8)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666)
    try:
        with os.fdopen(fd, "wb") as handle:  # (owns fd from here: closed on any error below)
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())  # on disk before the rename, so a power loss leaves the old file or the new
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
