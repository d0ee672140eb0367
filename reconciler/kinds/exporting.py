"""What every kind's `to_manifest` shares: the document it returns and the context it reads.
A kind turns one live object into a manifest document (`to_manifest(live, ctx) -> Doc | None`) and
names the live objects an export of it needs beside it (`export_needs(live, ctx)`); export.py is the
one generic loop over kinds that selects, calls them and checks the result."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..model import Live, ResourceId


@dataclass
class Doc:
    """One manifest document being exported, with the comments printed above it."""
    kind: str
    name: str
    spec: dict
    labels: dict = field(default_factory=dict)
    comments: list[str] = field(default_factory=list)
    # (env var, active) for MqttClient: active means the password line is live, not commented out.
    password: tuple[str, bool] | None = None

    def manifest(self) -> dict:
        meta: dict[str, Any] = {"name": self.name}
        if self.labels:
            meta["labels"] = dict(sorted(self.labels.items()))
        return {"apiVersion": "reconciler/v1", "kind": self.kind, "metadata": meta, "spec": self.spec}


@dataclass
class ExportContext:
    """The live objects read, the ones selected for this export, and notes on what was left out."""
    objects: Mapping[ResourceId, Live]
    selected: set[ResourceId]
    notes: list[str]
    disks_by_path: dict[str, Live] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not self.disks_by_path:
            self.disks_by_path = {l.facts.get("path"): l for rid, l in self.objects.items()
                                  if rid.kind == "Disk" and l.facts.get("path")}

    def exported(self, rid: ResourceId) -> bool:
        return rid in self.selected


def unmanaged_comment(live: Live) -> list[str]:
    return [] if live.managed else ["not marked as managed: applying this adopts it"]
