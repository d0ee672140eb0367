"""Prometheus series of runs, for node_exporter's textfile collector, written with prometheus-client
(its exposition format and escaping are the reference ones; write_to_textfile renames a finished
temporary file into place, so the collector never reads half a file).

Series (every kind, and every kind x action, is always present so that alerts see zeros):
  reconciler_drift{kind}                     declared resources whose live state differed at the start
                                             of the last run (for apply: what it set out to correct)
  reconciler_changes{kind,action}            changes applied in the last run
  reconciler_failures{kind}                  changes that failed (apply) or were refused (plan)
  reconciler_last_run_timestamp_seconds      when the last run ended
  reconciler_last_run_success                1 when it ended without an error or a failed change
  reconciler_last_success_timestamp_seconds  when a run last succeeded (kept across failed runs)
  reconciler_backup_age_seconds{vm}          seconds since each VM's newest good backup (VMs of a
                                             declared BackupPolicy), so an alert fires when backups stop
Inventory runs write one file for all hosts: every series carries host="...".
"""
from __future__ import annotations

import os
import time
from typing import Iterable

from prometheus_client import CollectorRegistry, Gauge, write_to_textfile

from ..model import VERBS
from ..outcome import Outcome

LAST_SUCCESS = "reconciler_last_success_timestamp_seconds"


def previous_successes(path: str) -> dict[str | None, float]:
    """The last-success time of each host (None: a single-host file) in the file a previous run wrote:
    a one-shot run has no other memory of it. Read with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except (OSError, UnicodeDecodeError):
        return {}
    out: dict[str | None, float] = {}
    try:
        for fam in text_string_to_metric_families(text):
            if fam.name == LAST_SUCCESS:
                for s in fam.samples:
                    out[s.labels.get("host")] = s.value
    except ValueError:
        return {}   # a file we did not write, or a broken one: start afresh
    return out


def registry_for(outcomes: Iterable[Outcome], last_success: dict[str | None, float], *,
                 by_host: bool, now: float | None = None) -> CollectorRegistry:
    """The run series of `outcomes` (one per host). `last_success` is updated in place for the
    hosts that succeeded, so a watch can keep it across rounds without reading any file."""
    from ..kinds.registry import NAMES
    now = time.time() if now is None else now
    reg = CollectorRegistry(auto_describe=False)
    host_label = ["host"] if by_host else []
    drift = Gauge("reconciler_drift", "Declared resources whose live state differed at the start of the last run, per kind.",
                  ["kind"] + host_label, registry=reg)
    changes = Gauge("reconciler_changes", "Changes applied in the last run, per kind and action.",
                    ["kind", "action"] + host_label, registry=reg)
    failures = Gauge("reconciler_failures", "Changes that failed (apply) or were refused (plan) in the last run, per kind.",
                     ["kind"] + host_label, registry=reg)
    last_run = Gauge("reconciler_last_run_timestamp_seconds", "When the last run ended (Unix time).",
                     host_label, registry=reg)
    success = Gauge("reconciler_last_run_success", "1 if the last run ended without an error or a failed change.",
                    host_label, registry=reg)
    last_ok = Gauge(LAST_SUCCESS, "When a run last succeeded (Unix time).", host_label, registry=reg)
    backup_age = Gauge("reconciler_backup_age_seconds", "Seconds since the VM's newest good backup.",
                       ["vm"] + host_label, registry=reg)
    for o in outcomes:
        h = [o.host or ""] if by_host else []
        d = {k: 0 for k in NAMES}
        c = {(k, v): 0 for k in NAMES for v in VERBS}
        f = {k: 0 for k in NAMES}
        if o.plan is not None:
            for a in o.plan.actions:
                d[a.id.kind] = d.get(a.id.kind, 0) + 1
                if o.results is None and a.refused:
                    f[a.id.kind] = f.get(a.id.kind, 0) + 1
        for r in o.results or ():
            if r.status == "applied" and r.action.verb in VERBS:
                c[(r.action.id.kind, r.action.verb)] = c.get((r.action.id.kind, r.action.verb), 0) + 1
            elif r.status == "failed":
                f[r.action.id.kind] = f.get(r.action.id.kind, 0) + 1
        for k, v in d.items():
            drift.labels(k, *h).set(v)
        for (k, verb), v in c.items():
            changes.labels(k, verb, *h).set(v)
        for k, v in f.items():
            failures.labels(k, *h).set(v)
        _one(last_run, h).set(round(now, 3))
        ok = o.ok and o.skipped is None
        _one(success, h).set(1 if ok else 0)
        key = o.host if by_host else None
        if ok:
            last_success[key] = round(now, 3)
        if key in last_success:
            _one(last_ok, h).set(last_success[key])
        if o.plan is not None:
            from ..kinds.backup import backup_ages_of_run
            for vm, age in backup_ages_of_run(o.plan, o.results, now).items():
                backup_age.labels(vm, *h).set(round(age))
    return reg


def _one(gauge: Gauge, host: list):
    """The gauge's child for this host, or the gauge itself when it has no labels."""
    return gauge.labels(*host) if host else gauge


def write_metrics(path: str, outcomes: Iterable[Outcome], *, by_host: bool = False,
                  last_success: dict[str | None, float] | None = None) -> None:
    """Write the run series of `outcomes` to `path` atomically. Without `last_success` (a one-shot
    run) the previous file's last-success times are carried over."""
    if last_success is None:
        last_success = previous_successes(path)
    write_registry(path, registry_for(outcomes, last_success, by_host=by_host))


def write_registry(path: str, *registries: CollectorRegistry) -> None:
    """One or more registries into one textfile, atomically, readable by node_exporter (0644). A family
    two registries both have is written once, from the first (node_exporter refuses duplicates)."""
    if len(registries) == 1:
        reg = registries[0]
    else:
        reg = CollectorRegistry(auto_describe=False)
        reg.register(_Merged(registries))
    write_to_textfile(path, reg)
    try:
        os.chmod(path, 0o644)
    except OSError:
        pass


class _Merged:
    """Other registries' families collected as one (a watch's VM and broker figures beside its run series)."""

    def __init__(self, registries):
        self.registries = registries

    def collect(self):
        seen: set[str] = set()
        for reg in self.registries:
            for fam in reg.collect():
                if fam.name not in seen:
                    seen.add(fam.name)
                    yield fam
