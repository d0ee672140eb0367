"""The libvirt provider's tables: which function carries out a (verb, kind) and which reads a kind.

A kind's libvirt code lives in its own module under providers/libvirt/ and registers itself here:

    @handles("create", "Network")
    def create_network(p: LibvirtProvider, a: Action, o: Options) -> str: ...

    @reads("Network")
    def read_networks(p: LibvirtProvider, conn, core: Snapshot) -> Snapshot: ...

Readers get the core read (pools, volumes, domains with their facts) rather than anything kept on
the provider.

Handlers get everything they need from the Action (the planner put it there) and the provider's
connection; they keep nothing between calls, so the applier may run them on several threads."""
from __future__ import annotations

from typing import Callable

HANDLERS: dict[tuple[str, str], Callable] = {}
READERS: dict[str, Callable] = {}


def handles(verb: str, kind: str):
    def register(fn: Callable) -> Callable:
        HANDLERS[(verb, kind)] = fn
        return fn
    return register


def reads(kind: str):
    def register(fn: Callable) -> Callable:
        READERS[kind] = fn
        return fn
    return register
