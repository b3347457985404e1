"""How a command ends other than by finishing: `UserError` (exit code 2) or `RunStopped` and its kinds."""

import errno
from pathlib import Path


def first_line(err: BaseException, limit: int | None = None) -> str:
    """An exception's message as it fits in one line of ours ('' when it has none)."""
    return (str(err).strip().splitlines() or [""])[0][:limit]


class UserError(Exception):
    """A mistake in the user's input: one line and exit code 2, never a traceback."""


class RunStopped(Exception):
    """The run stopped before its end; every file saved before stays usable."""

    exit_code = 1


class Diverged(RunStopped):
    def __init__(self, loss: float, step: int, epoch: int):
        super().__init__(f"the training loss is {loss} at optimizer step {step} (epoch {epoch}); the last resume point "
                         "and checkpoints are kept. Lower train.lr, keep train.max_grad_norm, or use "
                         "train.precision=fp32 or bf16")


class Preempted(RunStopped):
    """SIGTERM, as pre-emptible clouds send before a kill: the run saved a resume point and stopped."""

    exit_code = 143

    def __init__(self, step: int):
        super().__init__(f"terminated (SIGTERM) after optimizer step {step}; a resume point was saved there: continue "
                         "with the same command and --resume")


class LostPeer(RunStopped):
    """Another process of a multi-process run failed or stopped answering."""


class WriteFailed(RunStopped):
    """A write failed (disk full, read-only, not allowed); `then` says what to do next."""

    def __init__(self, path: Path, err: OSError, then: str = "run the same command again", verb: str = "write"):
        fix = "free some space" if err.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG) else "make it writable"
        super().__init__(f"cannot {verb} {path}: {err.strerror or err}; {fix}, then {then}")
        self.path, self.err = path, err


class WriterReplaced(RunStopped):
    def __init__(self, path: Path):
        super().__init__(f"{path} was removed or replaced while this process wrote the run, so another process may "
                         "now write it too; stopping here. Nothing saved before is lost: once no other process runs "
                         "it, continue with --resume")
