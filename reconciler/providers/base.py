"""The seam between deciding and doing: the Provider protocol every target implements."""
from __future__ import annotations

from typing import ClassVar, Iterable, Protocol

from ..model import Action, Options, Resource, Snapshot


class Provider(Protocol):
    kinds: ClassVar[tuple[str, ...]]

    def target(self) -> str:
        """The identity of the target (libvirt URI, broker URL) used for locking and messages."""

    def read(self, kinds: frozenset[str], desired: Iterable[Resource] = ()) -> Snapshot:
        """Bulk read of every live object of `kinds`, normalised to manifest shape (Live.spec). `desired`
        (the declared resources) lets it read what only a declared value can tell; it keeps nothing."""

    def apply(self, action: Action, options: Options) -> str:
        """Carry out one planned action; returns a short note for the output, raises ApplyError.
        Never decides whether to act: the planner did."""

    def close(self) -> None:
        ...
