"""What a run returns: the Outcome of one pass against one host (its plan, its results, its recap,
its exit code and error), and the exit codes themselves. Renderers, watch, inventory and saved plans
read Outcomes; nothing reads printed output back."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable

from .model import Plan, Result

# Exit codes, the contract's section 3: plan exits 2 when changes are pending.
EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2
_SEVERITY = {EXIT_OK: 0, EXIT_PENDING: 1, EXIT_ERROR: 2}


def worst(codes: Iterable[int]) -> int:
    """1 > 2 > 0: an error anywhere wins, then pending changes."""
    out = EXIT_OK
    for c in codes:
        c = c if c in _SEVERITY else EXIT_ERROR
        if _SEVERITY[c] > _SEVERITY[out]:
            out = c
    return out


@dataclass(frozen=True)
class Recap:
    """Ansible's play recap for one host."""
    ok: int = 0
    changed: int = 0
    failed: int = 0
    skipped: int = 0

    def as_dict(self) -> dict[str, int]:
        return {"ok": self.ok, "changed": self.changed, "failed": self.failed, "skipped": self.skipped}

    def line(self) -> str:
        return f"ok={self.ok} changed={self.changed} failed={self.failed} skipped={self.skipped}"


@dataclass(frozen=True)
class RunError:
    """Why a run stopped before or while it ran: one sentence, and where in the manifests when known."""
    message: str
    file: str | None = None
    line: int | None = None
    # The target's fault (down, refused login, lock held): watch and inventory back off on these.
    unreachable: bool = False

    def as_dict(self) -> dict:
        d: dict = {"error": self.message}
        if self.file:
            d["file"] = self.file
        if self.line:
            d["line"] = self.line
        return d


@dataclass(frozen=True)
class Outcome:
    """One pass against one host. `results` is None for a plan (nothing was applied)."""
    apply: bool
    plan: Plan | None = None
    results: tuple[Result, ...] | None = None
    error: RunError | None = None
    host: str | None = None
    # sha256 of the manifests' files as loaded (saved plans compare it).
    digest: str | None = None
    # Set when the run was skipped on purpose (an inventory host backing off): the reason.
    skipped: str | None = None
    extra: dict = field(default_factory=dict, compare=False)

    @property
    def code(self) -> int:
        if self.error is not None:
            return EXIT_ERROR
        if self.skipped is not None:
            return EXIT_OK
        if self.results is not None:
            return EXIT_ERROR if any(r.status == "failed" for r in self.results) else EXIT_OK
        if self.plan is None:
            return EXIT_ERROR
        if self.plan.refused:
            return EXIT_ERROR
        return EXIT_PENDING if self.plan.actions else EXIT_OK

    @property
    def ok(self) -> bool:
        """The run ended without an error, a failed change or a refused one."""
        return self.code != EXIT_ERROR

    @property
    def recap(self) -> Recap:
        if self.skipped is not None:
            return Recap(skipped=1)
        if self.results is not None:
            c = {"ok": 0, "applied": 0, "failed": 0, "skipped": 0}
            for r in self.results:
                c[r.status] = c.get(r.status, 0) + 1
            return Recap(c["ok"], c["applied"], c["failed"], c["skipped"])
        if self.plan is not None:
            refused = sum(1 for a in self.plan.actions if a.refused)
            return Recap(len(self.plan.unchanged), len(self.plan.actions) - refused, refused, 0)
        return Recap(failed=1) if self.error else Recap()
