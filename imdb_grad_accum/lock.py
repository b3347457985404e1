"""The writer's lock: flocks on the run directory and on its .lock (NFS), which the OS releases even on SIGKILL."""

import contextlib
import errno
import fcntl
import os
import sys
from pathlib import Path

from imdb_grad_accum.errors import UserError

LOCK = ".lock"


class RunLock:
    def __init__(self, path: Path):
        self.path = path
        self.fds: list[int] = []
        self.stats: dict[Path, os.stat_result] = {}  # what the lock was taken on, to tell if it was replaced

    @classmethod
    def take(cls, path: Path) -> "RunLock":
        lock = cls(path)
        try:
            path.mkdir(parents=True, exist_ok=True)
            folder = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
            lock.fds.append(folder)
            _flock(folder, path, optional=True)
            try:
                file = os.open(path / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
            except IsADirectoryError:
                raise UserError(f"{path / LOCK} is a folder, not the run's lock file; remove it if no process runs "
                                "this run, then repeat the command") from None
            lock.fds.append(file)
            _flock(file, path)
            lock.stats = {path: os.fstat(folder), path / LOCK: os.fstat(file)}
        except BaseException as err:
            lock.release()
            if isinstance(err, OSError):
                raise UserError(f"cannot lock {path}: {err.strerror}") from None
            raise
        return lock

    def announce(self) -> None:
        """Writes who holds the lock into .lock, at the first write (a command refused before then changed nothing)."""
        os.ftruncate(self.fds[-1], 0)
        os.pwrite(self.fds[-1], f"{os.getpid()} {' '.join(sys.argv)[:300]}\n".encode(errors="replace"), 0)

    def intact(self) -> bool:
        try:
            return all(os.path.samestat(os.stat(p), stat) for p, stat in self.stats.items())
        except OSError:
            return False

    def release(self) -> None:
        for fd in reversed(self.fds):
            os.close(fd)
        self.fds = []


def holder(path: Path) -> str:
    """Who holds the lock of the run at `path` ('process 123 (command)'), or '' when nobody does."""
    for locked in (path / LOCK, path):
        with contextlib.suppress(OSError):
            fd = os.open(locked, os.O_RDONLY)
            try:
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return _describe(path)
            finally:
                os.close(fd)
    return ""


def _describe(path: Path) -> str:
    try:
        pid, _, command = (path / LOCK).read_text(errors="replace").strip().partition(" ")
    except OSError:
        return "another process"
    return f"process {pid}" + (f" ({command[:160]})" if command else "") if pid.isdigit() else "another process"


def _flock(fd: int, run: Path, optional: bool = False) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        raise UserError(f"{run} is in use by {_describe(run)}; wait for it to end, or stop it first") from None
    except OSError as err:
        if optional and err.errno in (errno.EBADF, errno.ENOLCK, errno.EOPNOTSUPP, errno.EINVAL):
            return  # a filesystem that cannot lock folders (NFS): the .lock file's lock still stands
        raise
