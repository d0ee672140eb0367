"""Run a Plan through the providers in order and stream each Result to a reporter. Decides nothing
about what to change: refused and held actions are reported, dependents of a failure are skipped.

Consecutive actions of one kind and verb that do not need each other (500 VM creates, say) run on
a small thread pool when their provider says it is safe; results are still reported in plan order."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Mapping

from .errors import ReconcilerError
from .model import Action, Options, Plan, Result
from .providers.base import Provider

# Threads for a batch of independent actions: libvirt-python releases the GIL during each call
# and libvirtd serves one connection's calls concurrently; more than 4 buys nothing on 2 cores.
WORKERS = 4


def apply(plan: Plan, providers: Mapping[str, Provider], options: Options,
          on_result: Callable[[Result], None], workers: int = WORKERS) -> list[Result]:
    results: list[Result] = []
    failed: set = set()

    def record(r: Result) -> None:
        # Only a missing object blocks its dependents: a refused grow leaves the disk usable.
        if r.status in ("failed", "skipped") and r.action.verb == "create":
            failed.add(r.action.id)
        results.append(r)
        on_result(r)

    steps = list(plan.steps)
    i = 0
    pool: ThreadPoolExecutor | None = None
    try:
        while i < len(steps):
            batch = _batch(steps, i, providers)
            i += len(batch)
            if sum(1 for a in batch if a.verb != "noop") < 2:
                for a in batch:
                    record(_run(a, providers, options, failed))
                continue
            pool = pool or ThreadPoolExecutor(workers, thread_name_prefix="apply")
            futures = [pool.submit(_run, a, providers, options, failed) for a in batch]
            for f in futures:
                record(f.result())
    finally:
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)
    return results


def _batch(steps: list[Action], start: int, providers: Mapping[str, Provider]) -> list[Action]:
    """The longest run from `start` of one kind and verb (no-ops of that kind mixed in) whose members
    do not depend on each other, when the kind's provider allows concurrent actions."""
    first = steps[start]
    provider = providers.get(first.id.kind)
    if first.verb == "noop" or not getattr(provider, "parallel", False):
        return [first]
    ids = {first.id}
    out = [first]
    for a in steps[start + 1:]:
        if a.id.kind != first.id.kind or (a.verb != first.verb and a.verb != "noop") or any(n in ids for n in a.needs):
            break
        out.append(a)
        ids.add(a.id)
    return out


def _run(a: Action, providers: Mapping[str, Provider], options: Options, failed: set) -> Result:
    if a.verb == "noop":
        return Result(a, "ok", a.reason)
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
