"""The pure backup rules as data: Proxmox's prune-backups retention (kinds/backup.retain) on fixed
sets of backup times, and a month of scheduled runs through the real planner with an injected clock."""
from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from reconciler import planner
from reconciler.kinds import backup as rules
from reconciler.model import HostFacts, Live, Options, Resource, ResourceId, Snapshot


def T(text: str) -> float:
    return datetime.strptime(text, "%Y-%m-%d %H:%M").replace(tzinfo=timezone.utc).timestamp()


def days(first: str, n: int, at: str = "01:00") -> list[str]:
    d = datetime.strptime(first, "%Y-%m-%d")
    return [(d + timedelta(days=i)).strftime("%Y-%m-%d ") + at for i in range(n)]


CASES = [
    # (what, backups, keep, kept)
    ("last keeps the newest N", ["2026-01-01 01:00", "2026-01-02 01:00", "2026-01-03 01:00", "2026-01-04 01:00",
                                 "2026-01-05 01:00"], {"last": 3},
     ["2026-01-03 01:00", "2026-01-04 01:00", "2026-01-05 01:00"]),
    ("no rule keeps everything", ["2026-01-01 01:00", "2026-01-02 01:00"], {}, ["2026-01-01 01:00", "2026-01-02 01:00"]),
    ("daily keeps the newest of each of the last N days",
     ["2026-01-01 10:00", "2026-01-01 22:00", "2026-01-02 09:00", "2026-01-02 20:00", "2026-01-03 08:00"], {"daily": 2},
     ["2026-01-02 20:00", "2026-01-03 08:00"]),
    ("a period an earlier rule kept from is not counted again",
     ["2026-01-01 10:00", "2026-01-01 22:00", "2026-01-02 09:00", "2026-01-02 20:00", "2026-01-03 08:00"],
     {"last": 1, "daily": 2}, ["2026-01-01 22:00", "2026-01-02 20:00", "2026-01-03 08:00"]),
    ("hourly", ["2026-01-01 10:05", "2026-01-01 10:40", "2026-01-01 11:10", "2026-01-01 12:01", "2026-01-01 12:30"],
     {"hourly": 2}, ["2026-01-01 11:10", "2026-01-01 12:30"]),
    # Proxmox's documented example: daily backups, keep-daily 7 and keep-weekly 4. 2026-03-01 is a Sunday,
    # so the 7 dailies fill ISO week 9 and the weekly rule starts at week 8 (each week's newest is its Sunday).
    ("nightly, keep 7 daily and 4 weekly", days("2026-01-01", 60), {"daily": 7, "weekly": 4},
     days("2026-02-23", 7) + ["2026-02-01 01:00", "2026-02-08 01:00", "2026-02-15 01:00", "2026-02-22 01:00"]),
    ("monthly and yearly", ["2024-06-30 01:00", "2025-11-30 01:00", "2025-12-15 01:00", "2025-12-31 01:00",
                            "2026-01-15 01:00", "2026-01-31 01:00"], {"monthly": 2, "yearly": 2},
     ["2024-06-30 01:00", "2025-12-31 01:00", "2026-01-31 01:00"]),
    ("the newest is kept even when every count is 0", ["2026-01-01 01:00", "2026-01-02 01:00"], {"daily": 0},
     ["2026-01-02 01:00"]),
    ("nothing to keep from nothing", [], {"last": 3}, []),
]


@pytest.mark.parametrize("what,backups,keep,kept", CASES, ids=[c[0] for c in CASES])
def test_retain(what, backups, keep, kept):
    assert sorted(rules.retain([T(b) for b in backups], keep)) == sorted(T(k) for k in kept)


def test_names_and_times_round_trip():
    t = T("2026-11-27 13:05")
    st = rules.stamp(t)
    assert st == "20261127T130500Z" and rules.listed(t) == "2026-11-27T13:05:00Z"
    assert rules.parse_time(rules.listed(t)) == t == rules.parse_time(st)
    v = rules.parse_volume_name(rules.disk_volume_name("gw-1.a", "gw-1_nightly", st, "vda"))
    assert v == {"vm": "gw-1.a", "policy": "gw-1_nightly", "stamp": st, "time": t, "target": "vda", "manifest": False}
    assert rules.parse_volume_name(rules.manifest_volume_name("gw-1", "n", st))["manifest"] is True
    assert rules.parse_volume_name("gw-1-root") is None
    assert rules.parse_every("24h") == 86400 and rules.parse_every("1w") == 7 * 86400
    with pytest.raises(ValueError):
        rules.parse_every("soon")


# --------------------------------------------------------------------------- a month of scheduled runs

def _resources(keep: dict, every: str) -> list[Resource]:
    pol = Resource(ResourceId("BackupPolicy", "gw-nightly"),
                   rules.BackupPolicyRules.normalise({"vm": "gw", "pool": "backups", "every": every, "keep": keep}))
    return [pol]   # the VM is live and not declared here: the planner judges it as it is


def _snapshot(backups: list[float], now: float) -> Snapshot:
    bs = tuple(rules.Backup(vm="gw", policy="gw-nightly", pool="backups", stamp=rules.stamp(t), time=t, good=True,
                            volumes=(rules.manifest_volume_name("gw", "gw-nightly", rules.stamp(t)),)) for t in backups)
    objs = {ResourceId("VirtualMachine", "gw"): Live(ResourceId("VirtualMachine", "gw"), {}, managed=True,
                                                     facts={"state": "running"}),
            ResourceId("StoragePool", "backups"): Live(ResourceId("StoragePool", "backups"), {"path": "/b"}),
            ResourceId("BackupPolicy", "gw-nightly"): Live(ResourceId("BackupPolicy", "gw-nightly"), {},
                                                           managed=True, facts={"backups": bs})}
    return Snapshot(objs, HostFacts(now=now))


def _run(backups: list[float], now: float, keep: dict, every: str, fail: bool = False) -> list[float]:
    """One scheduled apply as the applier runs it: the create first, the prune only if the create worked."""
    plan = planner.plan(_resources(keep, every), _snapshot(backups, now), Options())
    acts = [a for a in plan.actions if a.id.kind == "BackupPolicy"]
    out = list(backups)
    created = False
    for a in acts:
        if a.verb == "create":
            assert not a.refused
            if not fail:
                out.append(now)
                created = True
        elif a.verb == "delete":
            if a.needs and not created:
                continue  # the applier skips a prune whose backup failed
            gone = {rules.parse_volume_name(n)["time"] for _, n in a.desired.spec["resolved"]["volumes"]}
            out = [t for t in out if t not in gone]
    return sorted(out)


def test_a_month_of_hourly_runs_keeps_exactly_what_keep_says():
    keep = {"daily": 7, "weekly": 4}
    start = T("2026-01-01 00:30")
    backups: list[float] = []
    for hour in range(60 * 24):
        backups = _run(backups, start + hour * 3600, keep, "24h")
    # One backup a day (each 24 h after the last, at 00:30), and the kept set is what retain() says of all of them.
    made = [start + d * 86400 for d in range(60)]
    assert backups == sorted(rules.retain(made, keep))
    assert len(backups) == 7 + 4


def test_a_failed_backup_never_causes_a_deletion_and_never_counts():
    keep = {"last": 2}
    t0 = T("2026-01-01 00:00")
    backups = [t0, t0 + 3600]
    after = _run(backups, t0 + 7200, keep, "1h", fail=True)
    assert after == backups
    plan = planner.plan(_resources(keep, "1h"), _snapshot(backups, t0 + 7200), Options())
    prune = [a for a in plan.actions if a.verb == "delete"]
    assert prune and prune[0].needs == (ResourceId("BackupPolicy", "gw-nightly"),)
    assert _run(backups, t0 + 7200, keep, "1h") == [t0 + 3600, t0 + 7200]


def test_a_backup_that_is_not_good_is_never_the_newest_and_is_removed():
    t0 = T("2026-01-01 00:00")
    bad = rules.Backup(vm="gw", policy="gw-nightly", pool="backups", stamp=rules.stamp(t0 + 100), time=t0 + 100,
                       good=False, volumes=("gw@gw-nightly@x@vda.qcow2",), problem="unfinished: no manifest")
    snap = _snapshot([t0], t0 + 200)
    live = snap.objects[ResourceId("BackupPolicy", "gw-nightly")]
    objs = dict(snap.objects)
    objs[live.id] = Live(live.id, {}, managed=True, facts={"backups": live.facts["backups"] + (bad,)})
    plan = planner.plan(_resources({"last": 5}, "1h"), Snapshot(objs, HostFacts(now=t0 + 200)), Options())
    acts = [(a.verb, a.id.kind) for a in plan.actions]
    # Not due (the good one is 200 s old): only the unfinished one's volumes go.
    assert acts == [("delete", "BackupPolicy")]
    assert plan.actions[0].desired.spec["resolved"]["volumes"] == [("backups", "gw@gw-nightly@x@vda.qcow2")]


def test_backup_ages_for_metrics():
    t0 = T("2026-01-01 00:00")
    snap = _snapshot([t0, t0 + 50], t0 + 100)
    ages = rules.backup_ages(snap.objects, t0 + 100)
    assert ages == {"gw": 50.0}
    # Written as reconciler_backup_age_seconds{vm} by render/metrics.py (tests/test_ops_metrics.py).


def test_backup_ages_after_a_run_count_the_backup_it_made():
    from reconciler.model import Result
    t0 = T("2026-01-01 00:00")
    plan = planner.plan(_resources({"last": 2}, "1h"), _snapshot([t0], t0 + 7200), Options())
    (create,) = [a for a in plan.actions if a.verb == "create"]
    assert rules.backup_ages_of_run(plan, None, t0 + 7200) == {"gw": 7200.0}
    assert rules.backup_ages_of_run(plan, [Result(create, "applied")], t0 + 7200) == {"gw": 0.0}
    assert rules.backup_ages_of_run(plan, [Result(create, "failed")], t0 + 7200) == {"gw": 7200.0}
