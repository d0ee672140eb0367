"""Ansible-style text: one line per resource as it is handled, --diff lines, orphans, the recap.
Made from Actions, Results and Outcomes only."""
from __future__ import annotations

import sys
import threading
from typing import IO

from ..config import Output
from ..model import Action, Plan, Result
from ..outcome import Outcome
from .values import as_text


def diff_lines(a: Action) -> list[str]:
    """Field-level before/after of an action; a create shows every field the manifest declares."""
    kind = a.id.kind
    if a.verb == "create" and a.desired is not None:
        out = []
        for key in sorted(a.desired.declared):
            path = f"spec.{key}"
            if key in ("password",) or _secret(a, path):
                out.append(f"    + {path}: (secret)")
            else:
                out.append(f"    + {path}: {as_text(kind, path, a.desired.spec.get(key))}")
        if a.desired.labels:
            out.append(f"    + metadata.labels: {as_text(kind, 'metadata.labels', dict(a.desired.labels))}")
        return out
    out = []
    for c in a.changes:
        if c.secret:
            out.append(f"    {c.path}: (secret, changed)")
        elif a.verb == "restart":
            out.append(f"    {c.path}: takes effect at restart")
        else:
            out.append(f"    {c.path}: {as_text(kind, c.path, c.before)} -> {as_text(kind, c.path, c.after)}  [{c.mode}]")
    return out


def _secret(a: Action, path: str) -> bool:
    return any(c.secret and c.path == path for c in a.changes)


class TextRenderer:
    """Writes one host's lines to a stream. With `host` every line is prefixed "host: "; a shared
    `lock` keeps parallel hosts' lines whole (inventory)."""

    def __init__(self, out: IO | None = None, output: Output = Output(), host: str | None = None,
                 lock: threading.Lock | None = None):
        self.out = out or sys.stdout
        self.diff, self.quiet = output.diff, output.quiet
        self.prefix = f"{host}: " if host else ""
        self.lock = lock or threading.Lock()

    def _emit(self, lines: list[str], flush: bool = True) -> None:
        if not lines:
            return
        with self.lock:
            self.out.write("".join(self.prefix + line + "\n" for line in lines))
            if flush:
                self.out.flush()

    def _action_lines(self, status: str, a: Action, text: str) -> list[str]:
        if self.quiet and status == "ok":
            return []
        lines = [f"{status}: [{a.id}] {text}"]
        if self.diff and status != "ok" and (a.changes or a.verb == "create"):
            lines += diff_lines(a)
        return lines

    # -- streaming, during an apply

    def result(self, r: Result) -> None:
        a = r.action
        if r.status == "ok":
            # "ok" lines ride along with the next flush: thousands of them, each flushed, cost more than the plan.
            self._emit(self._action_lines("ok", a, r.message), flush=False)
        elif r.status == "applied":
            self._emit(self._action_lines("changed", a, f"{a.verb}: {r.message}"))
        else:
            self._emit(self._action_lines(r.status, a, f"{a.verb}: {r.message}"))

    # -- whole outcomes

    def plan_lines(self, plan: Plan) -> list[str]:
        lines: list[str] = []
        for a in plan.steps:
            if a.verb == "noop":
                lines += self._action_lines("ok", a, a.reason)
            elif a.refused:
                lines += self._action_lines("failed", a, f"{a.verb} refused: {a.refused}")
            else:
                note = f" ({a.held})" if a.held else ""
                lines += self._action_lines("changed", a, f"would {a.verb}: {a.reason}{note}")
        return lines

    def orphan_lines(self, plan: Plan) -> list[str]:
        if self.quiet:
            return []
        return [f"orphan: [{rid}] {reason}" for rid, reason in plan.orphans]

    def finish(self, o: Outcome) -> None:
        """Everything not streamed: a plan's lines, orphans, the summary and the recap line."""
        lines: list[str] = []
        if o.skipped is not None:
            if not self.quiet:
                lines.append(f"skipped: {o.skipped}")
            self._emit(lines)
            return
        if o.plan is not None:
            if not o.apply:
                lines += self.plan_lines(o.plan)
            lines += self.orphan_lines(o.plan)
            if not self.quiet:
                lines.append("plan: " + ", ".join(f"{k}={v}" for k, v in o.plan.summary().items()))
        if o.plan is not None or o.results:
            lines.append(o.recap.line())
        self._emit(lines)

    def error(self, o: Outcome, stream: IO | None = None) -> None:
        """The error sentence, on stderr."""
        if o.error is not None:
            stream = stream or sys.stderr
            with self.lock:
                print(f"{self.prefix}error: {o.error.message}", file=stream, flush=True)
