"""PURE rules of the MQTT kinds (MqttRole, MqttGroup, MqttClient, Topic). Placeholder until issue 3."""
from __future__ import annotations

from ..model import Action


class _Unimplemented:
    @staticmethod
    def check(name, spec):
        return []

    @staticmethod
    def normalise(spec):
        return dict(spec)

    @staticmethod
    def references(spec):
        return []

    @staticmethod
    def classify(r, live, ctx):
        return [Action("noop", r.id, "not implemented", desired=r, live=live)]


MqttRoleRules = MqttGroupRules = MqttClientRules = TopicRules = _Unimplemented
