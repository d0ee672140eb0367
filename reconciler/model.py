"""Frozen value types that cross every seam: resources, live objects, field changes, actions, plans, results."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

# The kinds themselves (names, creation order, targets) are listed once: reconciler/kinds/registry.py.
VERBS = ("create", "update", "delete", "restart", "replace", "restore")


@dataclass(frozen=True, order=True)
class ResourceId:
    kind: str
    name: str

    def __str__(self) -> str:
        return f"{self.kind}/{self.name}"


@dataclass(frozen=True)
class Resource:
    """One manifest document, its spec normalised (quantities in bytes, defaults filled). Where it was
    written (file and line) is the manifest loader's business, not the model's."""
    id: ResourceId
    spec: Mapping[str, Any]
    labels: Mapping[str, str] = field(default_factory=dict)
    # The spec keys the user wrote; only these are compared with live state.
    declared: frozenset = frozenset()


@dataclass(frozen=True)
class Live:
    """One live object as a provider read it, in manifest shape.

    Ownership is typed: `managed` (the marker is there), `scope` (the marker's scope: --prune only
    deletes objects of its own), `labels`. `facts` holds what the kind's rules read besides the spec
    (a domain's state and running view, a volume's path, a password fingerprint)."""
    id: ResourceId
    spec: Mapping[str, Any]
    labels: Mapping[str, str] = field(default_factory=dict)
    managed: bool = False
    facts: Mapping[str, Any] = field(default_factory=dict)
    scope: str = "default"


@dataclass(frozen=True)
class FieldChange:
    path: str            # "spec.memory"
    before: Any
    after: Any
    mode: str = "live"   # live | config | restart | replace
    secret: bool = False  # before/after are never shown


@dataclass(frozen=True)
class Action:
    verb: str                       # create | update | delete | restart | replace | noop
    id: ResourceId
    reason: str
    changes: tuple = ()             # FieldChange, ...
    desired: Resource | None = None
    live: Live | None = None
    # Why this action may not run (a refused shrink, a replace without --allow-replace).
    refused: str | None = None
    # Why it is planned but held back by a missing flag (restart without --allow-restart).
    held: str | None = None
    # Resources this action needs to have succeeded first.
    needs: tuple = ()
    # The ownership scope the marker of what this action creates or changes must carry (set by the
    # planner, so a provider needs nothing from elsewhere).
    scope: str = "default"

    @property
    def fields(self) -> list[str]:
        return [c.path for c in self.changes]


@dataclass(frozen=True)
class Plan:
    steps: tuple                    # every decision in order, noops included, each with its reason
    orphans: tuple = ()             # (ResourceId, reason): live objects no manifest declares, kept

    @property
    def actions(self) -> tuple:
        return tuple(a for a in self.steps if a.verb != "noop")

    @property
    def unchanged(self) -> tuple:
        return tuple(a for a in self.steps if a.verb == "noop")

    @property
    def refused(self) -> bool:
        return any(a.refused for a in self.steps)

    def summary(self) -> dict[str, int]:
        s = {v: 0 for v in VERBS}
        for a in self.steps:
            if a.verb != "noop":
                s[a.verb] += 1
        s["unchanged"] = sum(1 for a in self.steps if a.verb == "noop")
        return s


@dataclass(frozen=True)
class Result:
    action: Action
    status: str                     # applied | failed | skipped
    message: str = ""


@dataclass(frozen=True)
class HostFacts:
    """What providers read about the host itself rather than about one object, which the kinds consult."""
    # {arch: {alias: canonical}} from the host's capabilities ("pc" -> "pc-i440fx-7.2").
    machine_aliases: Mapping[str, Mapping[str, str]] = field(default_factory=dict)
    # kinds.libvirt.HypervisorAccess of a local qemu:///system: folders QEMU's user cannot reach.
    hypervisor_access: Any = None
    # Source images of disks still to be created, by path: {sha256, format, virtual_size} or {error}.
    images: Mapping[str, Any] = field(default_factory=dict)
    # The clock of the read (Unix time), for schedules such as a BackupPolicy's `every`.
    now: float | None = None

    def merged(self, other: "HostFacts") -> "HostFacts":
        """These facts with what `other` read added (a fact another provider left empty stays)."""
        return HostFacts(
            machine_aliases={**self.machine_aliases, **other.machine_aliases},
            hypervisor_access=other.hypervisor_access if other.hypervisor_access is not None else self.hypervisor_access,
            images={**self.images, **other.images},
            now=other.now if other.now is not None else self.now)


@dataclass(frozen=True)
class Snapshot:
    """Everything the providers read: the live objects by id, and the host's own facts."""
    objects: Mapping[ResourceId, Live] = field(default_factory=dict)
    host: HostFacts = field(default_factory=HostFacts)

    def merged(self, other: "Snapshot") -> "Snapshot":
        return Snapshot({**self.objects, **other.objects}, self.host.merged(other.host))


@dataclass(frozen=True)
class Options:
    prune: bool = False
    force: bool = False
    allow_restart: bool = False
    allow_replace: bool = False
    # The ownership scope: --prune only touches managed objects of the same scope, so that two
    # repositories (or two test runs) can share one host.
    scope: str = "default"
    # Seconds a graceful shutdown may take before the VM is forced off.
    shutdown_timeout: float = 60.0
