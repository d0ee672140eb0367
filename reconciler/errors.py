"""The exception tree. Every error a user can cause or meet is one of these, carrying one clear sentence.

    ReconcilerError            base; cli.py prints str(e) to stderr and exits 1, never a traceback
    ├── ManifestError          bad input: file, line, kind and name are part of the message
    ├── TargetError            a target is unreachable, refuses the login, or went away
    ├── LockError              another run holds the target's lock past --lock-timeout
    └── ApplyError             one action failed; the applier records it and goes on with independent work
"""
from __future__ import annotations


class ReconcilerError(Exception):
    """Base of every error that is reported to the user as one sentence."""


class ManifestError(ReconcilerError):
    """A manifest is invalid. `where` is "file:line" when known."""

    def __init__(self, message: str, *, file: str | None = None, line: int | None = None,
                 kind: str | None = None, name: str | None = None):
        self.file, self.line, self.kind, self.name = file, line, kind, name
        where = ""
        if file:
            where = f"{file}:{line}: " if line else f"{file}: "
        what = ""
        if kind and name:
            what = f"{kind} {name!r}: "
        elif kind:
            what = f"{kind}: "
        elif name:
            what = f"{name!r}: "
        self.message = message
        super().__init__(f"{where}{what}{message}")


class TargetError(ReconcilerError):
    """A target (libvirt or broker) cannot be used."""


class LockError(ReconcilerError):
    """Another run holds the lock of a target."""


class ApplyError(ReconcilerError):
    """One action could not be applied."""
