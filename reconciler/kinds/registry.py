"""The one table of kinds: every kind the reconciler knows, in creation order, with its target.

A kind is one object (today a class of static methods) with:
  kind       the manifest's `kind:` ("VirtualMachine")
  target     "libvirt" | "mqtt": which provider reads and changes it
  prunable   its live objects carry an ownership marker, so `--prune` may delete them
  check(name, spec) -> [(path, message)]     offline rules beyond the JSON Schema
  normalise(spec) -> spec                    units in bytes, defaults filled
  references(spec) -> [(kind, name, path)]   names of other declared objects it needs
  resolve_paths(spec, base) -> spec          (optional) relative paths against the manifest's folder
  consults                                   (optional) kinds whose live objects its rules read besides its own
  classify(desired, live, ctx) -> [Action]   PURE: desired vs live, each action with its reason
Adding a kind = a module with that object + reconciler/schemas/<Kind>.json + its provider handlers,
and one line in KINDS below (its position is its creation order; deletions run in reverse).
"""
from __future__ import annotations

from .backup import BackupPolicyRules, RestoreRules, SnapshotRules
from .libvirt import DiskRules, StoragePoolRules, VirtualMachineRules
from .network import NetworkRules
from .mqtt import MqttClientRules, MqttDefaultsRules, MqttGroupRules, MqttRoleRules, TopicRules

KINDS = (
    StoragePoolRules,
    DiskRules,
    NetworkRules,          # before the VMs attached to it; deleted after them
    VirtualMachineRules,
    SnapshotRules,         # after its VM; deleted before it
    RestoreRules,          # after Snapshots are taken, before a backup copies the result
    BackupPolicyRules,
    MqttRoleRules,
    MqttGroupRules,
    MqttDefaultsRules,
    MqttClientRules,
    TopicRules,
)

BY_NAME = {k.kind: k for k in KINDS}
NAMES = tuple(k.kind for k in KINDS)
# Creation order; deletions run in the reverse of it.
ORDER = {k.kind: i for i, k in enumerate(KINDS)}
PRUNABLE = frozenset(k.kind for k in KINDS if k.prunable)


def to_read(declared: set[str]) -> frozenset[str]:
    """The kinds a plan of `declared` kinds must read: those, every prunable kind (--prune deletes managed
    objects no manifest declares), and what their rules consult (`consults`: a VM may not be deleted
    while it has snapshots). A VM-only repository never lists networks or backup volumes."""
    out = set(declared) | set(PRUNABLE)
    todo = list(out)
    while todo:
        for k in getattr(BY_NAME.get(todo.pop()), "consults", ()):
            if k not in out:
                out.add(k)
                todo.append(k)
    return frozenset(out)


def of_target(target: str) -> tuple[str, ...]:
    """The kind names one provider serves ("libvirt" or "mqtt"), in creation order."""
    return tuple(k.kind for k in KINDS if k.target == target)
