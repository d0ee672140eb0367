"""The planning context: the one object passed to every kind's pure classify function."""
from __future__ import annotations

from ..model import HostFacts, Options


class PlanContext:
    """What a classify function may consult besides its own desired and live objects."""

    def __init__(self, desired: dict, objects: dict, host: HostFacts, options: Options):
        self.desired = desired        # ResourceId -> Resource
        self.objects = objects        # ResourceId -> Live
        self.host = host              # the host's own facts: machine aliases, QEMU's access, images, clock
        self.options = options
        self.memo: dict = {}          # indexes a kind builds once per plan (Topic ACLs by role)
