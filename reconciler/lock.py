"""One lock per target, held for a whole apply, so that two runs never interleave.

flock(2) locks vanish with the process that held them, so a run killed with -9 never blocks the next."""
from __future__ import annotations

import errno
import fcntl
import hashlib
import os
import sys
import tempfile
import time

from .errors import LockError


def lock_dir() -> str:
    d = os.environ.get("RECONCILER_LOCK_DIR")
    if not d:
        d = "/run/lock/reconciler" if os.geteuid() == 0 and os.path.isdir("/run/lock") else \
            os.path.join(tempfile.gettempdir(), f"reconciler-{os.geteuid()}")
    os.makedirs(d, mode=0o700, exist_ok=True)
    return d


class TargetLock:
    """An exclusive lock on one target; a second holder waits up to `timeout` seconds."""

    def __init__(self, target: str, timeout: float, say=lambda msg: print(msg, file=sys.stderr)):
        self.target = target
        self.timeout = timeout
        self.say = say
        digest = hashlib.sha256(target.encode()).hexdigest()[:20]
        self.path = os.path.join(lock_dir(), f"{digest}.lock")
        self.fd: int | None = None

    def __enter__(self) -> "TargetLock":
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        deadline = time.monotonic() + self.timeout
        told = False
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except OSError as e:
                if e.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
                    os.close(fd)
                    raise
            holder = _read_holder(fd)
            if time.monotonic() >= deadline:
                os.close(fd)
                raise LockError(f"another reconciler run{holder} holds the lock on {self.target}; "
                                f"gave up after {self.timeout:g}s (see --lock-timeout)")
            if not told:
                self.say(f"waiting for another reconciler run{holder} to finish with {self.target} "
                         f"(up to {self.timeout:g}s)")
                told = True
            time.sleep(0.1)
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        self.fd = fd
        return self

    def __exit__(self, *exc) -> None:
        if self.fd is not None:
            fcntl.flock(self.fd, fcntl.LOCK_UN)
            os.close(self.fd)
            self.fd = None


def _read_holder(fd: int) -> str:
    try:
        pid = os.pread(fd, 32, 0).decode().strip()
    except OSError:
        return ""
    return f" (pid {pid})" if pid.isdigit() else ""
