"""The pure rules of each kind, by kind name: check, normalise, references, classify.
The table itself is kinds/registry.py."""
from __future__ import annotations

from .context import PlanContext
from .registry import BY_NAME as KIND_RULES
from .registry import PRUNABLE

__all__ = ["KIND_RULES", "PRUNABLE", "PlanContext"]
