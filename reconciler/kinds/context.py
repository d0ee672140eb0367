"""The planning context: the one object passed to every kind's pure classify function."""
from __future__ import annotations

from ..model import Options


class PlanContext:
    """What a classify function may consult besides its own desired and live objects."""

    def __init__(self, desired: dict, objects: dict, context: dict, options: Options):
        self.desired = desired        # ResourceId -> Resource
        self.objects = objects        # ResourceId -> Live
        self.context = context        # provider facts: pools on the host, machine aliases, ...
        self.options = options
        self.memo: dict = {}          # indexes a kind builds once per plan (Topic ACLs by role)
