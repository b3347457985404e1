"""Writing files so that a kill never leaves half a file under its real name, and a failed write is one line naming
the file (`WriteFailed`), never a traceback."""

from __future__ import annotations

import contextlib
import hashlib
import os
from pathlib import Path

from exp_1.errors import WriteFailed


def write_file(path: Path, data: bytes | str) -> str:
    """Write `data` under a temporary name, flush it to disk and rename it into place; returns its sha256."""
    data = data.encode() if isinstance(data, str) else data
    tmp = path.with_name(f".{path.name}.tmp")
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as err:
        with contextlib.suppress(OSError):  # on a read-only or vanished folder the cleanup fails too
            tmp.unlink(missing_ok=True)
        raise WriteFailed(path, err) from None
    return hashlib.sha256(data).hexdigest()


def append_line(path: Path, line: str) -> None:
    """Append one line (history.jsonl), naming the file when the write fails."""
    try:
        with open(path, "a", encoding="utf-8") as f:
            f.write(line)
    except OSError as err:
        raise WriteFailed(path, err) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def fsync_dir(folder: Path) -> None:
    """Make a rename inside `folder` durable."""
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
