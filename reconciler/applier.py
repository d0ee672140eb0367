"""Run a Plan through the providers in order and stream each Result to a reporter. Decides nothing
about what to change: refused and held actions are reported, dependents of a failure are skipped."""
from __future__ import annotations

from typing import Callable, Mapping

from .errors import ReconcilerError
from .model import Action, Options, Plan, Result
from .providers.base import Provider


def apply(plan: Plan, providers: Mapping[str, Provider], options: Options,
          on_result: Callable[[Result], None]) -> list[Result]:
    results: list[Result] = []
    failed: set = set()

    def record(r: Result) -> None:
        # Only a missing object blocks its dependents: a refused grow leaves the disk usable.
        if r.status in ("failed", "skipped") and r.action.verb == "create":
            failed.add(r.action.id)
        results.append(r)
        on_result(r)

    for a in plan.steps:
        if a.verb == "noop":
            record(Result(a, "ok", a.reason))
            continue
        record(_run(a, providers, options, failed))
    return results


def _run(a: Action, providers: Mapping[str, Provider], options: Options, failed: set) -> Result:
    if a.refused:
        return Result(a, "failed", f"refused: {a.refused}")
    if a.held:
        # A pending restart is optional work; a replace that is not allowed leaves the VM unlike its manifest.
        return Result(a, "failed" if a.verb == "replace" else "skipped", a.held)
    blocked = [str(n) for n in a.needs if n in failed]
    if blocked:
        return Result(a, "skipped", f"not attempted: {', '.join(blocked)} failed")
    try:
        note = providers[a.id.kind].apply(a, options)
    except ReconcilerError as e:
        return Result(a, "failed", str(e))
    return Result(a, "applied", note or a.reason)
