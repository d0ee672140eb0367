"""The pure rules of each kind, by kind name: check, normalise, references, classify."""
from __future__ import annotations

from .context import PlanContext
from .libvirt import DiskRules, StoragePoolRules, VirtualMachineRules
from .mqtt import MqttClientRules, MqttGroupRules, MqttRoleRules, TopicRules

KIND_RULES = {
    "StoragePool": StoragePoolRules,
    "Disk": DiskRules,
    "VirtualMachine": VirtualMachineRules,
    "MqttRole": MqttRoleRules,
    "MqttGroup": MqttGroupRules,
    "MqttClient": MqttClientRules,
    "Topic": TopicRules,
}

# Kinds whose live objects carry an ownership marker and so may be pruned.
PRUNABLE = ("VirtualMachine", "MqttRole", "MqttGroup", "MqttClient", "Topic")

__all__ = ["KIND_RULES", "PRUNABLE", "PlanContext"]
