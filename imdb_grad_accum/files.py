"""Writing files and folders so that a kill never leaves half of one under its real name."""

import contextlib
import hashlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator, Optional

from imdb_grad_accum.errors import WriteFailed


def write_file(path: Path, data: bytes | str, scratch: Optional[Path] = None) -> str:
    """Write `data` beside `path` (or in `scratch`), flush it and rename it into place; returns its sha256."""
    data = data.encode() if isinstance(data, str) else data
    tmp = None
    try:
        fd, tmp = tempfile.mkstemp(dir=scratch or path.parent, prefix=f".{path.name}.", suffix=".tmp")
        with open(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes it private; a written file is as any new file would be
        os.replace(tmp, path)
    except OSError as err:
        if tmp:
            with contextlib.suppress(OSError):  # on a read-only or vanished folder the cleanup fails too
                os.unlink(tmp)
        raise WriteFailed(path, err) from None
    return hashlib.sha256(data).hexdigest()


@contextlib.contextmanager
def write_folder(path: Path, scratch: Optional[Path] = None, name: Optional[str] = None) -> Iterator[Path]:
    """Yields an empty folder (beside `path`, or `scratch/name` for several processes) that replaces `path` when the
    block ends without an error; only folders this call made are ever deleted."""
    try:
        if name is not None:
            tmp = scratch / name
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        else:
            tmp = Path(tempfile.mkdtemp(dir=scratch or path.parent, prefix=f".{path.name}.", suffix=".tmp"))
    except OSError as err:
        raise WriteFailed(path, err) from None
    try:
        yield tmp
        for file in tmp.rglob("*"):
            if file.is_file() and not file.is_symlink():
                file.chmod(0o666 & ~_umask())  # as any new file: save_pretrained makes some private
                with open(file, "rb") as f:
                    os.fsync(f.fileno())
        tmp.chmod(0o777 & ~_umask())
        old = None
        if path.exists():
            old = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}.", suffix=".old"))
            os.replace(path, old)  # onto the empty folder just made: the previous folder, whole
        os.replace(tmp, path)
        if old is not None:
            shutil.rmtree(old)
    except BaseException as err:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(err, OSError):  # named at the file's place in `path` when the error names it
            failed = Path(err.filename) if isinstance(err.filename, str) else None
            raise WriteFailed(path / failed.relative_to(tmp) if failed and failed.is_relative_to(tmp) else path,
                              err) from None
        raise


def append_line(path: Path, line: str) -> None:
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
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
