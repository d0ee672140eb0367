"""PURE rules of the backup kinds (Snapshot, Restore, BackupPolicy), the retention rule (Proxmox's
prune-backups), and the names and timestamps backups are kept under. No I/O: the clock comes from
the snapshot's host facts (`now`), so every decision here can be tested as data."""
from __future__ import annotations

import re
import time
from dataclasses import dataclass, replace
from datetime import datetime, timezone
from typing import Any, Iterable

from ..model import Action, FieldChange, Live, Resource, ResourceId
from .context import PlanContext

# --------------------------------------------------------------------------- names and times

# Backup volumes are `<vm>@<policy>@<stamp>@<target>.qcow2`, each backup's manifest `<vm>@<policy>@<stamp>.json`.
# `@` cannot occur in a VM, policy or disk-target name, so the parts always split back unambiguously,
# and no declared Disk can ever collide with a backup volume.
SEP = "@"
STAMP_FORMAT = "%Y%m%dT%H%M%SZ"
LISTED_FORMAT = "%Y-%m-%dT%H:%M:%SZ"
_VOLUME = re.compile(r"^(?P<vm>[A-Za-z0-9][A-Za-z0-9._-]*)@(?P<policy>[A-Za-z0-9][A-Za-z0-9._-]*)@"
                     r"(?P<stamp>\d{8}T\d{6}Z)(?:@(?P<target>[A-Za-z0-9]+)\.(?P<ext>qcow2|raw)|\.(?P<json>json))$")

KEEP_RULES = ("last", "hourly", "daily", "weekly", "monthly", "yearly")
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d|w)\s*$")
_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}


def parse_every(text: Any) -> float:
    """Seconds from "90s", "30m", "24h", "7d", "1w" (or a number of seconds)."""
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        if text <= 0:
            raise ValueError(f"{text} must be greater than zero")
        return float(text)
    m = _DURATION.match(str(text))
    if not m or float(m.group(1)) <= 0:
        raise ValueError(f"{text!r} is not a duration (write 30m, 24h, 7d or 1w)")
    return float(m.group(1)) * _DURATION_UNITS[m.group(2)]


def stamp(t: float) -> str:
    """The compact UTC stamp in volume names: 20261127T130500Z."""
    return datetime.fromtimestamp(int(t), timezone.utc).strftime(STAMP_FORMAT)


def listed(t: float) -> str:
    """A backup's time as `reconciler backups` lists it and `at:` accepts it: 2026-11-27T13:05:00Z."""
    return datetime.fromtimestamp(int(t), timezone.utc).strftime(LISTED_FORMAT)


def parse_time(text: str) -> float | None:
    """Seconds from a listed time (2026-11-27T13:05:00Z) or a stamp (20261127T130500Z); None if neither."""
    for fmt in (LISTED_FORMAT, STAMP_FORMAT):
        try:
            return datetime.strptime(str(text).strip(), fmt).replace(tzinfo=timezone.utc).timestamp()
        except ValueError:
            continue
    return None


def parse_volume_name(name: str) -> dict | None:
    """The parts of a backup volume's name, or None when it is not one."""
    m = _VOLUME.match(name)
    if not m:
        return None
    t = parse_time(m.group("stamp"))
    if t is None:
        return None
    return {"vm": m.group("vm"), "policy": m.group("policy"), "stamp": m.group("stamp"), "time": t,
            "target": m.group("target"), "manifest": bool(m.group("json"))}


def disk_volume_name(vm: str, policy: str, st: str, target: str, fmt: str = "qcow2") -> str:
    return f"{vm}{SEP}{policy}{SEP}{st}{SEP}{target}.{fmt}"


def manifest_volume_name(vm: str, policy: str, st: str) -> str:
    return f"{vm}{SEP}{policy}{SEP}{st}.json"


def ago(seconds: float) -> str:
    """A rough age for plans: 25h, 3d, 40m, 12s."""
    s = max(0, int(seconds))
    for unit, n in (("d", 86400), ("h", 3600), ("m", 60)):
        if s >= 2 * n or (unit == "m" and s >= n):
            return f"{s // n}{unit}"
    return f"{s}s"


# --------------------------------------------------------------------------- retention

def _bucket(rule: str, t: float) -> Any:
    d = datetime.fromtimestamp(t, timezone.utc)
    if rule == "hourly":
        return d.strftime("%Y-%m-%d %H")
    if rule == "daily":
        return d.strftime("%Y-%m-%d")
    if rule == "weekly":
        y, w, _ = d.isocalendar()
        return (y, w)
    if rule == "monthly":
        return d.strftime("%Y-%m")
    return d.strftime("%Y")


def retain(times: Iterable[float], keep: dict[str, int] | None) -> set[float]:
    """The backup times that `keep` keeps, by Proxmox's prune-backups rule (in UTC):

    rules run in the order last, hourly, daily, weekly, monthly, yearly; each walks the backups from
    newest to oldest, skips those an earlier rule already kept or marked, skips every backup in a
    period (hour, day, ISO week, month, year) where an earlier rule already kept one, keeps the newest
    backup of each new period until it has kept its count, and marks the older ones in that period
    removed. Whatever no rule kept goes. No rule at all (keep omitted or empty) keeps everything.
    The newest backup is always kept, whatever the counts: it may be the only good one there is."""
    ordered = sorted(set(times), reverse=True)
    if not ordered:
        return set()
    rules = {k: int(v) for k, v in (keep or {}).items() if k in KEEP_RULES and v is not None}
    if not rules:
        return set(ordered)
    mark: dict[float, str] = {}
    for rule in KEEP_RULES:
        count = rules.get(rule, 0)
        if count <= 0:
            continue
        key = (lambda t: t) if rule == "last" else (lambda t, r=rule: _bucket(r, t))
        already = {key(t) for t in ordered if mark.get(t) == "keep"}
        fresh: set = set()
        for t in ordered:
            b = key(t)
            if t in mark or b in already:
                continue
            if b not in fresh:
                if len(fresh) >= count:
                    break
                fresh.add(b)
                mark[t] = "keep"
            else:
                mark[t] = "remove"
    kept = {t for t, m in mark.items() if m == "keep"}
    kept.add(ordered[0])
    return kept


# --------------------------------------------------------------------------- the backups in a snapshot

@dataclass(frozen=True)
class Backup:
    """One backup as read from its pool: good only when its manifest is complete and every disk it
    lists is there. `volumes` are all the volume names of this backup (manifest included)."""
    vm: str
    policy: str
    pool: str
    stamp: str
    time: float
    good: bool
    disks: tuple = ()            # ({"target", "volume", "format", "capacity"}, ...)
    volumes: tuple = ()
    consistency: str = ""        # crash-consistent | frozen
    size: int = 0                # bytes allocated, when known
    problem: str = ""            # why it is not good

    @property
    def when(self) -> str:
        return listed(self.time)


def _as_backup(b: Any) -> Backup:
    """Backups in facts are Backup values (from the reader) or plain mappings (planner cases as data)."""
    if isinstance(b, Backup):
        return b
    b = dict(b)
    if "time" not in b and "when" in b:
        b["time"] = parse_time(b.pop("when"))
    b.setdefault("stamp", stamp(b["time"]))
    b.setdefault("pool", "backups")
    b.setdefault("good", True)
    b["disks"] = tuple(b.get("disks", ()))
    b["volumes"] = tuple(b.get("volumes", ()))
    return Backup(**b)


def live_backups(live: Live | None) -> list[Backup]:
    return [_as_backup(b) for b in live.facts.get("backups", ())] if live is not None else []


def backups_of(ctx_objects: dict, policy: str, vm: str | None = None) -> list[Backup]:
    return [b for b in live_backups(ctx_objects.get(ResourceId("BackupPolicy", policy))) if vm is None or b.vm == vm]


def backup_ages(objects: dict, now: float) -> dict[str, float]:
    """Seconds since each VM's newest good backup, from a snapshot's objects (for status and for the
    reconciler_backup_age_seconds{vm} series). VMs with no good backup are not listed."""
    newest: dict[str, float] = {}
    for rid, live in objects.items():
        if rid.kind != "BackupPolicy":
            continue
        for b in live_backups(live):
            if b.good and b.time > newest.get(b.vm, float("-inf")):
                newest[b.vm] = b.time
    return {vm: max(0.0, now - t) for vm, t in sorted(newest.items())}


def backup_ages_of_run(plan: Any, results: Iterable[Any] | None, now: float) -> dict[str, float]:
    """Newest-backup age per VM after a run, from its plan and results alone (no I/O): what the plan
    read, with 0 for a VM whose backup this run made. For reconciler_backup_age_seconds{vm} in the
    metrics file of plan/apply."""
    objects = {a.id: a.live for a in plan.steps if a.id.kind == "BackupPolicy" and a.live is not None}
    ages = backup_ages(objects, now)
    for r in results or ():
        a = r.action
        if a.id.kind == "BackupPolicy" and a.verb == "create" and r.status == "applied" and a.desired is not None:
            ages[a.desired.spec["vm"]] = 0.0
    return dict(sorted(ages.items()))


# --------------------------------------------------------------------------- shared helpers

def _noop(r: Resource, live: Live | None, reason: str) -> Action:
    return Action("noop", r.id, reason, desired=r, live=live)


def _vm_plan(ctx: PlanContext, vm: str) -> tuple[Live | None, Resource | None]:
    rid = ResourceId("VirtualMachine", vm)
    return ctx.objects.get(rid), ctx.desired.get(rid)


def _vm_state_after_plan(ctx: PlanContext, vm: str) -> str | None:
    """The state the VM will be in once the plan's VM actions ran: declared, else as it is."""
    live, want = _vm_plan(ctx, vm)
    if want is not None:
        return want.spec["state"]
    return live.facts.get("state", "shutoff") if live is not None else None


def _with(r: Resource, **resolved: Any) -> Resource:
    """The desired resource with what the handler needs resolved at plan time (the Action carries everything)."""
    return replace(r, spec={**r.spec, "resolved": resolved})


# --------------------------------------------------------------------------- Snapshot

class SnapshotRules:
    kind = "Snapshot"
    target = "libvirt"
    # A snapshot is a moment that cannot be made again: only `state: absent` deletes one, never --prune.
    prunable = False

    @staticmethod
    def check(name: str, spec: dict):
        return []

    @staticmethod
    def normalise(spec: dict) -> dict:
        return {"vm": spec["vm"], "memory": bool(spec.get("memory", False)),
                "description": spec.get("description"), "state": spec.get("state", "present")}

    @staticmethod
    def references(spec: dict):
        yield ("VirtualMachine", spec["vm"], ("spec", "vm"))

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        d = r.spec
        vm = d["vm"]
        if d["state"] == "absent":
            if live is None:
                return [_noop(r, None, "absent as declared")]
            if live.facts.get("vanished"):
                return [Action("delete", r.id, "the snapshot has already vanished: forget its record on the VM",
                               desired=r, live=live)]
            if live.facts.get("domain") != vm:
                return [Action("delete", r.id, "state: absent", desired=r, live=live,
                               refused=f"the snapshot {r.id.name!r} on the host belongs to VM "
                                       f"{live.facts.get('domain')!r}, not {vm!r}; correct spec.vm")]
            return [Action("delete", r.id, f"state: absent (taken {listed(live.facts.get('taken', 0))})",
                           desired=r, live=live)]
        vm_live, vm_want = _vm_plan(ctx, vm)
        if vm_want is not None and vm_want.spec["state"] == "absent":
            return [Action("create", r.id, "snapshot does not exist", desired=r,
                           refused=f"its VM {vm!r} is declared absent")]
        if live is None:
            if vm_live is None and vm_want is None:
                return [Action("create", r.id, "snapshot does not exist", desired=r,
                               refused=f"VM {vm!r} does not exist")]
            state = _vm_state_after_plan(ctx, vm)
            how = ("disks and RAM" if d["memory"] else
                   "disks (libvirt 9.0 saves the RAM of a running VM too; a restore boots from the disks)") \
                if state in ("running", "paused") else "disks (the VM is shut off)"
            return [Action("create", r.id, f"take snapshot of {vm}: {how}", desired=r,
                           needs=(ResourceId("VirtualMachine", vm),),
                           changes=(FieldChange("spec.vm", None, vm, "live"),))]
        taken = listed(live.facts.get("taken", 0))
        if live.facts.get("vanished"):
            return [Action("create", r.id, "snapshot has vanished", desired=r, live=live,
                           refused=f"snapshot {r.id.name!r} of VM {vm} was taken at {taken} and has vanished "
                                   f"(deleted outside the reconciler?); it is not retaken silently: set "
                                   f"state: absent to forget it, or declare a Snapshot with a new name")]
        refusals = []
        if live.facts.get("domain") != vm:
            refusals.append(f"spec.vm cannot change ({live.facts.get('domain')} -> {vm}): a snapshot is of one VM; "
                            f"declare a Snapshot with a new name")
        elif live.managed and live.spec.get("memory") != d["memory"]:
            refusals.append(f"spec.memory cannot change ({live.spec.get('memory')} -> {d['memory']}): the moment was "
                            f"taken as it was; declare a Snapshot with a new name")
        elif not live.managed and d["memory"] and not live.facts.get("has_memory"):
            # Adopting a snapshot made by hand: one with RAM serves memory: false too, not the reverse.
            refusals.append("spec.memory: true, but this snapshot (made outside the reconciler) holds no RAM; "
                            "declare memory: false, or a Snapshot with a new name")
        if refusals:
            return [Action("update", r.id, "; ".join(refusals), desired=r, live=live, refused="; ".join(refusals))]
        changes = []
        if not live.managed:
            changes.append(FieldChange("metadata.managed", False, True, "live"))
        if "description" in r.declared and d["description"] != (live.spec.get("description") or None):
            changes.append(FieldChange("spec.description", live.spec.get("description"), d["description"], "live"))
        if changes:
            return [Action("update", r.id, "in place (live): " + ", ".join(c.path for c in changes),
                           desired=r, live=live, changes=tuple(changes))]
        return [_noop(r, live, f"taken {taken}; vm, memory and description match")]


# --------------------------------------------------------------------------- BackupPolicy

class BackupPolicyRules:
    kind = "BackupPolicy"
    target = "libvirt"
    prunable = False

    @staticmethod
    def check(name: str, spec: dict):
        try:
            parse_every(spec.get("every"))
        except ValueError as e:
            return [(("spec", "every"), str(e))]
        return []

    @staticmethod
    def normalise(spec: dict) -> dict:
        keep = spec.get("keep")
        return {"vm": spec["vm"], "pool": spec["pool"], "every": parse_every(spec["every"]),
                "keep": {k: int(keep[k]) for k in KEEP_RULES if keep and k in keep}}

    @staticmethod
    def references(spec: dict):
        yield ("VirtualMachine", spec["vm"], ("spec", "vm"))

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        from .libvirt import pool_path
        d = r.spec
        vm = d["vm"]
        vm_live, vm_want = _vm_plan(ctx, vm)
        mine = [b for b in live_backups(live) if b.vm == vm]
        good = sorted((b for b in mine if b.good), key=lambda b: b.time)
        debris = [b for b in mine if not b.good]
        if vm_want is not None and vm_want.spec["state"] == "absent":
            return [_noop(r, live, f"VM {vm} is declared absent: no new backups; its {len(good)} backup(s) are kept")]
        if pool_path(ctx, d["pool"]) is None:
            return [Action("create", r.id, "backup due", desired=r, live=live,
                           refused=f"pool {d['pool']!r} is neither declared nor on the host")]
        now = ctx.host.now
        newest = good[-1] if good else None
        # Without a clock (a planner case that gives none) only a missing backup is due.
        due = newest is None or (now is not None and now - newest.time >= d["every"])
        actions: list[Action] = []
        if due:
            state = _vm_state_after_plan(ctx, vm)
            how = "live, the VM keeps running" if state in ("running", "paused") else "a copy of the shut-off VM's disks"
            why = "no good backup yet" if newest is None else \
                f"newest is {ago(now - newest.time)} old ({newest.when}), every {ago(d['every'])}"
            if debris:
                why += f"; first removing {len(debris)} unfinished backup(s)"
            actions.append(Action("create", r.id, f"back up {vm} to pool {d['pool']} ({how}): {why}", desired=_with(
                r, debris=[v for b in debris for v in b.volumes], live=state in ("running", "paused")),
                live=live, needs=(ResourceId("VirtualMachine", vm),),
                changes=(FieldChange("backups.newest", newest.when if newest else None, "now", "live"),)))
        # Retention counts the backup this run makes (it runs first, and the delete is skipped if it fails).
        upcoming = now if now is not None else (newest.time + d["every"] if newest else 0.0)
        times = [b.time for b in good] + ([upcoming] if due else [])
        kept = retain(times, d["keep"])
        pruned = [b for b in good if b.time not in kept]
        leftover = debris if not due else []
        if pruned or leftover:
            what = []
            if pruned:
                what.append(f"{len(pruned)} backup(s) that keep {_keep_text(d['keep'])} no longer keeps: "
                            + ", ".join(b.when for b in pruned))
            if leftover:
                what.append(f"{len(leftover)} unfinished backup(s): " + ", ".join(b.when for b in leftover))
            actions.append(Action("delete", r.id, "prune " + "; ".join(what),
                                  desired=_with(r, volumes=[(b.pool, v) for b in pruned + leftover for v in b.volumes]),
                                  live=live, needs=(r.id,) if due else (),
                                  changes=tuple(FieldChange(f"backups[{b.when}]", "kept", None, "live")
                                                for b in pruned + leftover)))
        if not actions:
            return [_noop(r, live, f"newest backup {ago(now - newest.time) + ' old ' if now else ''}({newest.when}), "
                                   f"{len(good)} kept as keep {_keep_text(d['keep'])} says")]
        return actions


def _keep_text(keep: dict) -> str:
    return "{" + ", ".join(f"{k}: {v}" for k, v in keep.items()) + "}" if keep else "(all)"


# --------------------------------------------------------------------------- Restore

class RestoreRules:
    kind = "Restore"
    target = "libvirt"
    prunable = False
    consults = ("Snapshot", "BackupPolicy")     # what it restores from

    @staticmethod
    def check(name: str, spec: dict):
        b = spec.get("backup")
        if b is not None and str(b.get("at", "latest")) != "latest" and parse_time(str(b["at"])) is None:
            return [(("spec", "backup", "at"), f"{b['at']!r} is not a backup time: write latest, or a time "
                                               f"as `reconciler backups` lists it (2026-11-27T13:05:00Z)")]
        return []

    @staticmethod
    def normalise(spec: dict) -> dict:
        b = spec.get("backup")
        return {"vm": spec["vm"], "snapshot": spec.get("snapshot"),
                "backup": {"policy": b["policy"], "at": str(b.get("at", "latest"))} if b else None}

    @staticmethod
    def references(spec: dict):
        yield ("VirtualMachine", spec["vm"], ("spec", "vm"))
        if spec.get("snapshot"):
            yield ("Snapshot", spec["snapshot"], ("spec", "snapshot"))
        if spec.get("backup"):
            yield ("BackupPolicy", spec["backup"]["policy"], ("spec", "backup", "policy"))

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        d = r.spec
        vm = d["vm"]
        if live is not None and live.facts.get("domain") == vm:
            return [_noop(r, live, f"done at {listed(live.facts.get('done', 0))}; a Restore runs once "
                                   f"(declare one with a new name to restore again)")]
        vm_live, vm_want = _vm_plan(ctx, vm)

        def refuse(why: str) -> list[Action]:
            return [Action("restore", r.id, "restore not possible", desired=r, refused=why)]

        pending = sorted(x.id.name for x in ctx.desired.values() if x.id.kind == "Restore" and x.spec["vm"] == vm
                         and not (ctx.objects.get(x.id) and ctx.objects[x.id].facts.get("domain") == vm))
        if len(pending) > 1:
            return refuse(f"{len(pending)} Restores of VM {vm} are pending ({', '.join(pending)}): declare one at a "
                          f"time, so that which moment the VM comes back to is never a matter of order")

        if vm_want is not None and vm_want.spec["state"] == "absent":
            return refuse(f"its VM {vm!r} is declared absent")
        if vm_live is None:
            return refuse(f"VM {vm!r} does not exist yet: there is nothing to restore")
        state = _vm_state_after_plan(ctx, vm)
        running = vm_live.facts.get("state") in ("running", "paused")
        if d["snapshot"]:
            sid = ResourceId("Snapshot", d["snapshot"])
            snap, snap_want = ctx.objects.get(sid), ctx.desired.get(sid)
            if snap_want is not None and snap_want.spec["vm"] != vm:
                return refuse(f"snapshot {d['snapshot']!r} is of VM {snap_want.spec['vm']!r}, not {vm!r}")
            if snap_want is not None and snap_want.spec["state"] == "absent":
                return refuse(f"snapshot {d['snapshot']!r} is declared absent")
            if snap is None or snap.facts.get("vanished") or snap.facts.get("domain") != vm:
                gone = "has vanished" if snap is not None and snap.facts.get("vanished") else "does not exist"
                return refuse(f"snapshot {d['snapshot']!r} of VM {vm} {gone}")
            moment = snap.facts.get("taken", 0)
            disks = list(snap.facts.get("disks", ())) or [x.get("target") for x in vm_live.spec.get("disks", ())
                                                          if x.get("device", "disk") == "disk"]
            source = f"snapshot {d['snapshot']} ({listed(moment)})"
            resolved = {"snapshot": d["snapshot"], "memory": bool(snap.spec.get("memory")), "state": state}
        else:
            pol = d["backup"]["policy"]
            good = sorted((b for b in backups_of(ctx.objects, pol, vm) if b.good), key=lambda b: b.time)
            at = d["backup"]["at"]
            if at == "latest":
                chosen = good[-1] if good else None
            else:
                t = parse_time(at)
                chosen = next((b for b in good if b.time == t), None)
            if chosen is None:
                listed_ = ", ".join(b.when for b in good[-5:]) or "none"
                return refuse(f"no good backup of VM {vm} by policy {pol!r} at {at} (good ones: {listed_})")
            moment = chosen.time
            disks = [x["target"] for x in chosen.disks]
            source = f"backup {chosen.when} of policy {pol}"
            resolved = {"backup": {"pool": chosen.pool, "stamp": chosen.stamp, "time": chosen.time,
                                   "disks": [dict(x) for x in chosen.disks]}, "state": state}
        lost = f"changes to {', '.join(disks) or 'its disks'} since {listed(moment)} are lost"
        stop = "; the running VM is stopped (graceful, then forced after --shutdown-timeout)" if running else ""
        back = f" and returned to {state}" if state else ""
        return [Action("restore", r.id, f"bring {vm} back to {source}: {lost}{stop}{back}",
                       desired=_with(r, **resolved), live=live,
                       needs=tuple(x for x in (ResourceId("Snapshot", d["snapshot"]) if d["snapshot"] else None,)
                                   if x is not None),
                       changes=tuple(FieldChange(f"disks[{t}]", "current content", f"content at {listed(moment)}",
                                                 "restart" if running else "config") for t in disks))]


def now() -> float:
    """The clock the reader puts into the snapshot's host facts (tests inject theirs instead)."""
    return time.time()
