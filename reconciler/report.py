"""Render plans and results: Ansible-style text lines with a recap, --diff, JSON, Prometheus metrics."""
from __future__ import annotations

import json
import os
import sys
import tempfile
import time
from typing import IO, Any

from .kinds.libvirt import show
from .kinds.registry import NAMES as KINDS
from .model import Action, Plan, Result


def _value(path: str, v: Any) -> str:
    v = show(path, v)
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, separators=(", ", ": "))
    return "(none)" if v is None else str(v)


def diff_lines(a: Action) -> list[str]:
    out = []
    for c in a.changes:
        if c.secret:
            out.append(f"    {c.path}: (secret, changed)")
        elif a.verb == "restart":
            out.append(f"    {c.path}: takes effect at restart")
        else:
            out.append(f"    {c.path}: {_value(c.path, c.before)} -> {_value(c.path, c.after)}  [{c.mode}]")
    return out


class TextReport:
    """One line per resource as it is handled, then the recap line."""

    def __init__(self, out: IO = sys.stdout, *, diff=False, quiet=False, verbose=False, host: str | None = None):
        self.out, self.diff, self.quiet, self.verbose = out, diff, quiet, verbose
        self.prefix = f"{host}: " if host else ""
        self.counts = {"ok": 0, "changed": 0, "failed": 0, "skipped": 0}

    def _line(self, status: str, a: Action, text: str) -> None:
        self.counts[status] += 1
        if self.quiet and status == "ok":
            return
        # "ok" lines ride along with the next flush: thousands of them, each flushed, cost more than the plan.
        print(f"{self.prefix}{status}: [{a.id}] {text}", file=self.out, flush=status != "ok")
        if self.diff and status != "ok" and a.changes:
            for line in diff_lines(a):
                print(self.prefix + line, file=self.out)
            self.out.flush()

    def planned(self, plan: Plan) -> None:
        for a in plan.steps:
            if a.verb == "noop":
                self._line("ok", a, a.reason)
            elif a.refused:
                self._line("failed", a, f"{a.verb} refused: {a.refused}")
            else:
                note = f" ({a.held})" if a.held else ""
                self._line("changed", a, f"would {a.verb}: {a.reason}{note}")
        self.orphans(plan)

    def result(self, r: Result) -> None:
        a = r.action
        if r.status == "ok":
            self._line("ok", a, r.message)
        elif r.status == "applied":
            self._line("changed", a, f"{a.verb}: {r.message}")
        else:
            self._line(r.status, a, f"{a.verb}: {r.message}")

    def orphans(self, plan: Plan) -> None:
        if self.quiet:
            return
        for rid, reason in plan.orphans:
            print(f"{self.prefix}orphan: [{rid}] {reason}", file=self.out, flush=True)

    def recap(self, plan: Plan | None = None) -> None:
        if plan is not None and not self.quiet:
            s = plan.summary()
            print(f"{self.prefix}plan: " + ", ".join(f"{k}={v}" for k, v in s.items()), file=self.out)
        c = self.counts
        print(f"{self.prefix}ok={c['ok']} changed={c['changed']} failed={c['failed']} skipped={c['skipped']}",
              file=self.out, flush=True)


def _change(a: Action, status: str, message: str | None = None) -> dict:
    d = {"action": a.verb, "kind": a.id.kind, "name": a.id.name, "fields": a.fields,
         "status": status, "reason": a.reason, "diff": [_field_diff(c) for c in a.changes]}
    if a.refused:
        d["error"] = a.refused
    elif a.held:
        d["held"] = a.held
    if message and status == "failed":
        d["error"] = message
    return d


def _field_diff(c) -> dict:
    """One field's before/after as JSON values (quantities in the units a user writes); a secret's never."""
    if c.secret:
        return {"path": c.path, "mode": c.mode, "secret": True}
    return {"path": c.path, "before": _jsonable(show(c.path, c.before)), "after": _jsonable(show(c.path, c.after)),
            "mode": c.mode}


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def plan_json(plan: Plan) -> dict:
    return {"changes": [_change(a, "failed" if a.refused else "planned") for a in plan.actions],
            "summary": plan.summary(),
            "orphans": [{"kind": i.kind, "name": i.name, "reason": r} for i, r in plan.orphans]}


def apply_json(plan: Plan, results: list[Result]) -> dict:
    changes = [_change(r.action, r.status, r.message) for r in results if r.status != "ok"]
    recap = {"ok": 0, "changed": 0, "failed": 0, "skipped": 0}
    for r in results:
        recap["changed" if r.status == "applied" else r.status] += 1
    return {"changes": changes, "summary": plan.summary(), "recap": recap,
            "orphans": [{"kind": i.kind, "name": i.name, "reason": r} for i, r in plan.orphans]}


def write_metrics(path: str, plan: Plan | None, results: list[Result] | None, ok: bool,
                  host: str | None = None) -> None:
    """Prometheus text format for node_exporter's textfile collector, written atomically (a temporary
    file in the same folder, then rename), so the collector never reads half a file.

    Series (every kind, and every kind x action, is always present so that alerts see zeros):
      reconciler_drift{kind}                     declared resources whose live state differed at the start
                                                 of the last run (for apply: what it set out to correct)
      reconciler_changes{kind,action}            changes applied in the last run
      reconciler_failures{kind}                  changes that failed (apply) or were refused (plan)
      reconciler_last_run_timestamp_seconds      when the last run ended
      reconciler_last_run_success                1 when it ended without an error or a failed change
      reconciler_last_success_timestamp_seconds  when a run last succeeded (kept across failed runs)
    With `host` (inventory runs) every series carries host="...".
    """
    from .model import VERBS

    def esc(v: str) -> str:
        return v.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")

    def series(name: str, labels: dict, value) -> str:
        if host:
            labels = {**labels, "host": host}
        inner = ",".join(f'{k}="{esc(str(v))}"' for k, v in labels.items())
        return f"{name}{{{inner}}} {value}" if inner else f"{name} {value}"

    drift = {k: 0 for k in KINDS}
    changes = {(k, v): 0 for k in KINDS for v in VERBS}
    failures = {k: 0 for k in KINDS}
    if plan is not None:
        for a in plan.actions:
            drift[a.id.kind] += 1
            if results is None and a.refused:
                failures[a.id.kind] += 1
    for r in results or []:
        if r.status == "applied" and r.action.verb in VERBS:
            changes[(r.action.id.kind, r.action.verb)] += 1
        elif r.status == "failed":
            failures[r.action.id.kind] += 1
    now = time.time()
    last_success = now if ok else _previous_value(path, "reconciler_last_success_timestamp_seconds")
    lines = ["# HELP reconciler_drift Declared resources whose live state differed at the start of the last run, per kind.",
             "# TYPE reconciler_drift gauge"]
    lines += [series("reconciler_drift", {"kind": k}, v) for k, v in drift.items()]
    lines += ["# HELP reconciler_changes Changes applied in the last run, per kind and action.",
              "# TYPE reconciler_changes gauge"]
    lines += [series("reconciler_changes", {"kind": k, "action": v}, n) for (k, v), n in changes.items()]
    lines += ["# HELP reconciler_failures Changes that failed (apply) or were refused (plan) in the last run, per kind.",
              "# TYPE reconciler_failures gauge"]
    lines += [series("reconciler_failures", {"kind": k}, v) for k, v in failures.items()]
    lines += ["# HELP reconciler_last_run_timestamp_seconds When the last run ended (Unix time).",
              "# TYPE reconciler_last_run_timestamp_seconds gauge",
              series("reconciler_last_run_timestamp_seconds", {}, f"{now:.3f}"),
              "# HELP reconciler_last_run_success 1 if the last run ended without an error or a failed change.",
              "# TYPE reconciler_last_run_success gauge",
              series("reconciler_last_run_success", {}, 1 if ok else 0)]
    if last_success is not None:
        lines += ["# HELP reconciler_last_success_timestamp_seconds When a run last succeeded (Unix time).",
                  "# TYPE reconciler_last_success_timestamp_seconds gauge",
                  series("reconciler_last_success_timestamp_seconds", {}, last_success if isinstance(last_success, str)
                         else f"{last_success:.3f}")]
    write_atomically(path, "\n".join(lines) + "\n")


def write_atomically(path: str, text: str) -> None:
    """Write, fsync, then rename into place: node_exporter never reads a half-written file."""
    directory = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(prefix=".reconciler-metrics-", suffix=".tmp", dir=directory)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _previous_value(path: str, name: str) -> str | None:
    """A sample's value in the metrics file a previous run wrote, or None (write_metrics' helper)."""
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                if line.startswith(name + " ") or line.startswith(name + "{"):
                    return line.rsplit(" ", 1)[1].strip()
    except (OSError, UnicodeDecodeError, IndexError):
        return None
    return None