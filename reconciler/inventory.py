"""`plan/apply --inventory FILE`: many hosts, each one reconcile pass (run.reconcile) with its own
targets and providers, run in parallel threads (--forks), filtered by --limit, with per-host output
lines and an Ansible-style recap. The exit code is the worst of the hosts' (1 > 2 > 0).

Every host's fields fall back to the command line / environment when the inventory leaves them out
(libvirtUri -> --libvirt-uri, mqttUrl -> --mqtt-url, mqttUsername -> --mqtt-username, mqttPassword ->
RECONCILER_MQTT_PASSWORD[_FILE], mqttCafile -> --mqtt-cafile). Relative paths (manifests, a
fromFile password, mqttCafile) are relative to the inventory file's folder. The transport to a remote
host is libvirt's own (qemu+ssh://, qemu+tls://) and MQTT over TLS (mqtts://): nothing home-made.
"""
from __future__ import annotations

import fnmatch
import io
import json
import os
import re
import shutil
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import IO, Callable

from .errors import LockError, ManifestError, ReconcilerError, TargetError

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2
_SEVERITY = {EXIT_OK: 0, EXIT_PENDING: 1, EXIT_ERROR: 2}


def worst(codes) -> int:
    """1 > 2 > 0: an error anywhere wins, then pending changes."""
    out = EXIT_OK
    for c in codes:
        c = c if c in _SEVERITY else EXIT_ERROR
        if _SEVERITY[c] > _SEVERITY[out]:
            out = c
    return out


@dataclass(frozen=True)
class Host:
    name: str
    manifests: tuple[str, ...]
    libvirt_uri: str
    mqtt_url: str
    mqtt_username: str | None
    mqtt_password: dict | None = field(default=None, repr=False)   # a secret source, read when the host runs
    mqtt_cafile: str | None = None
    line: int = 0

    def targets(self, default_password: Callable[[], str | None]):
        from .run import Targets
        from .secrets import read_secret
        if self.mqtt_password is not None:
            try:
                password = read_secret(self.mqtt_password)
            except ManifestError as e:
                raise ManifestError(f"host {self.name!r}: mqttPassword: {e.message}") from None
        else:
            password = default_password()
        return Targets(self.libvirt_uri, self.mqtt_url, self.mqtt_username, password, self.mqtt_cafile)


@dataclass
class HostOutcome:
    code: int
    counts: dict = field(default_factory=lambda: {"ok": 0, "changed": 0, "failed": 0, "skipped": 0})
    error: str | None = None
    unreachable: bool = False       # the error was the target's (down, refused login, lock held)
    report: dict | None = None      # -o json: the host's own JSON object


# --------------------------------------------------------------------------- loading

def load(path: str, args) -> list[Host]:
    """The hosts of an Inventory file, validated against schemas/Inventory.json."""
    from .manifest import _line_of, _schema_message, load_documents, validator
    docs = load_documents(path)
    if len(docs) != 1:
        raise ManifestError(f"an inventory file holds exactly one document, this one has {len(docs)}", file=path)
    data, node = docs[0]
    if not isinstance(data, dict) or data.get("kind") != "Inventory":
        raise ManifestError("not an Inventory (kind: Inventory, apiVersion: reconciler/v1)", file=path,
                            line=_line_of(node, ("kind",)))
    errors = list(validator("Inventory").iter_errors(data))
    if errors:
        err = max(errors, key=lambda e: len(list(e.absolute_path)))
        raise ManifestError(_schema_message(err, "Inventory"), file=path, line=_line_of(node, tuple(err.absolute_path)),
                            kind="Inventory")
    base = os.path.dirname(os.path.abspath(path))

    def rel(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for i, h in enumerate(data["hosts"]):
        line = _line_of(node, ("hosts", i))
        if h["name"] in seen:
            raise ManifestError(f"host {h['name']!r} is listed twice (first at line {seen[h['name']]})",
                                file=path, line=line, kind="Inventory")
        seen[h["name"]] = line
        pw = h.get("mqttPassword")
        if pw is not None and "fromFile" in pw:
            pw = {"fromFile": rel(pw["fromFile"])}
        cafile = h.get("mqttCafile", args.mqtt_cafile)
        hosts.append(Host(
            name=h["name"], manifests=tuple(rel(m) for m in h["manifests"]),
            libvirt_uri=h.get("libvirtUri", args.libvirt_uri), mqtt_url=h.get("mqttUrl", args.mqtt_url),
            mqtt_username=h.get("mqttUsername", args.mqtt_username), mqtt_password=pw,
            mqtt_cafile=rel(cafile) if cafile and "mqttCafile" in h else cafile, line=line))
    return hosts


def select(hosts: list[Host], limit: str | None) -> list[Host]:
    """--limit: comma-separated host names or shell patterns (edge-*)."""
    if not limit:
        return hosts
    patterns = [p.strip() for p in limit.split(",") if p.strip()]
    chosen = [h for h in hosts if any(fnmatch.fnmatchcase(h.name, p) for p in patterns)]
    if not chosen:
        raise ReconcilerError(f"--limit {limit} matches no host of the inventory "
                              f"(hosts: {', '.join(h.name for h in hosts)})")
    return chosen


# --------------------------------------------------------------------------- output plumbing

class _LineWriter(io.TextIOBase):
    """A per-host stream into a shared one: whole lines only, under a lock, so that parallel hosts
    never interleave inside a line. Remembers the host's recap counts as they pass."""

    def __init__(self, out: IO, lock: threading.Lock, host: str):
        self.out, self.lock, self.buf = out, lock, ""
        self.recap = re.compile(rf"^{re.escape(host)}: ok=(\d+) changed=(\d+) failed=(\d+) skipped=(\d+)$")
        self.counts: dict | None = None

    def writable(self) -> bool:
        return True

    def write(self, s: str) -> int:
        self.buf += s
        if "\n" in self.buf:
            done, self.buf = self.buf.rsplit("\n", 1)
            for line in done.split("\n"):
                m = self.recap.match(line)
                if m:
                    self.counts = dict(zip(("ok", "changed", "failed", "skipped"), map(int, m.groups())))
            with self.lock:
                self.out.write(done + "\n")
                self.out.flush()
        return len(s)

    def flush(self) -> None:
        pass

    def close_line(self) -> None:
        if self.buf:
            self.write("\n")


def _password_from_env(args) -> Callable[[], str | None]:
    def read() -> str | None:
        password = os.environ.get("RECONCILER_MQTT_PASSWORD")
        pw_file = os.environ.get("RECONCILER_MQTT_PASSWORD_FILE")
        if password is None and pw_file:
            from .secrets import read_secret
            password = read_secret({"fromFile": pw_file})
        return password
    return read


# --------------------------------------------------------------------------- running

def reconcile_hosts(args, hosts: list[Host], *, apply: bool, stop: threading.Event | None = None,
                    skip: dict[str, str] | None = None, stdout: IO | None = None,
                    stderr: IO | None = None, metrics_dir: str | None = None) -> dict[str, HostOutcome]:
    """One pass over `hosts` in parallel; `skip` maps hosts to leave out this time to the reason."""
    from .cli import _options
    from .progress import PlainProgress, Stoppable
    from .report import write_metrics
    from .run import Output, reconcile
    stdout = stdout or sys.stdout
    stderr = stderr or sys.stderr
    skip = skip or {}
    stop = stop or threading.Event()
    options = _options(args)
    lock = threading.Lock()
    text = args.output == "text"
    outcomes: dict[str, HostOutcome] = {}

    class Stopped(ReconcilerError):
        pass

    def one(h: Host) -> HostOutcome:
        metrics = os.path.join(metrics_dir, f"{h.name}.prom") if metrics_dir else None
        if h.name in skip or stop.is_set():
            reason = skip.get(h.name, "stopping")
            if text and not args.quiet:
                with lock:
                    stdout.write(f"{h.name}: skipped: {reason}\n")
                    stdout.flush()
            if metrics:
                write_metrics(metrics, None, None, False, h.name)
            return HostOutcome(EXIT_ERROR if h.name in skip else EXIT_OK,
                               {"ok": 0, "changed": 0, "failed": 0, "skipped": 1}, error=None)
        writer = _LineWriter(stdout, lock, h.name) if text else io.StringIO()
        out = Output(args.output, args.diff, args.quiet, args.verbose, metrics, h.name)
        progress = Stoppable(PlainProgress(stderr, h.name), stop, Stopped)
        try:
            targets = h.targets(_password_from_env(args))
            code = reconcile(list(h.manifests), targets, options, out, apply=apply,
                             lock_timeout=getattr(args, "lock_timeout", 300.0), stdout=writer, progress=progress)
        except Stopped:
            return HostOutcome(EXIT_OK, error="stopped by a signal")
        except ReconcilerError as e:
            if metrics:
                write_metrics(metrics, None, None, False, h.name)
            with lock:
                print(f"{h.name}: error: {e}", file=stderr, flush=True)
            return HostOutcome(EXIT_ERROR, {"ok": 0, "changed": 0, "failed": 1, "skipped": 0}, error=str(e),
                               unreachable=isinstance(e, (TargetError, LockError)))
        except Exception as e:  # a bug must not take the other hosts down
            if metrics:
                write_metrics(metrics, None, None, False, h.name)
            with lock:
                print(f"{h.name}: error: internal error: {type(e).__name__}: {e}", file=stderr, flush=True)
            return HostOutcome(EXIT_ERROR, {"ok": 0, "changed": 0, "failed": 1, "skipped": 0},
                               error=f"internal error: {type(e).__name__}: {e}")
        if text:
            writer.close_line()
            return HostOutcome(code, writer.counts or {"ok": 0, "changed": 0, "failed": 0, "skipped": 0})
        try:
            report = json.loads(writer.getvalue())
        except ValueError:
            report = {"output": writer.getvalue()}
        return HostOutcome(code, report.get("recap") or _counts_from_plan(report), report=report)

    forks = max(1, int(getattr(args, "forks", 10) or 1))
    with ThreadPoolExecutor(max_workers=min(forks, len(hosts)) or 1, thread_name_prefix="host") as pool:
        futures = {h.name: pool.submit(one, h) for h in hosts}
        try:
            for name, f in futures.items():
                outcomes[name] = f.result()
        except KeyboardInterrupt:
            stop.set()
            for f in futures.values():
                f.cancel()
            raise
    return outcomes


def _counts_from_plan(report: dict) -> dict:
    changes = report.get("changes", [])
    return {"ok": report.get("summary", {}).get("unchanged", 0),
            "changed": sum(1 for c in changes if c.get("status") != "failed"),
            "failed": sum(1 for c in changes if c.get("status") == "failed"), "skipped": 0}


def print_recap(hosts: list[Host], outcomes: dict[str, HostOutcome], stdout: IO) -> None:
    stdout.write("\nRECAP\n")
    for h in hosts:
        o = outcomes[h.name]
        c = o.counts
        stdout.write(f"{h.name} : ok={c['ok']} changed={c['changed']} failed={c['failed']} skipped={c['skipped']}\n")
    stdout.flush()


def json_report(hosts: list[Host], outcomes: dict[str, HostOutcome]) -> dict:
    out: dict = {}
    for h in hosts:
        o = outcomes[h.name]
        if o.report is not None:
            out[h.name] = o.report
        else:
            entry: dict = {"changes": [], "summary": None}
            if o.error:
                entry["error"] = o.error
            elif o.counts.get("skipped"):
                entry["skipped"] = True
            out[h.name] = entry
    return {"hosts": out}


def merge_metrics(sources: list[str], path: str) -> None:
    """One Prometheus text file from several (one per host): each family's HELP/TYPE once, then all
    of its samples. Written atomically, like write_metrics."""
    families: dict[str, dict] = {}
    for src in sources:
        try:
            with open(src, encoding="utf-8") as f:
                lines = f.read().splitlines()
        except OSError:
            continue
        for line in lines:
            if line.startswith("# HELP ") or line.startswith("# TYPE "):
                name = line.split(" ", 3)[2]
                fam = families.setdefault(name, {"head": [], "samples": []})
                if line not in fam["head"]:
                    fam["head"].append(line)
            elif line and not line.startswith("#"):
                name = re.split(r"[{ ]", line, 1)[0]
                families.setdefault(name, {"head": [], "samples": []})["samples"].append(line)
    text = "".join("\n".join(f["head"] + f["samples"]) + "\n" for f in families.values())
    from .report import write_atomically
    write_atomically(path, text)


def _seed_metrics(previous: str, host: str, dest: str) -> None:
    """Carry a host's last-success timestamp from the merged file into its own, for write_metrics."""
    try:
        with open(previous, encoding="utf-8") as f:
            for line in f:
                if line.startswith("reconciler_last_success_timestamp_seconds") and f'host="{host}"' in line:
                    with open(dest, "w", encoding="utf-8") as out:
                        out.write(line)
                    return
    except OSError:
        return


def run_pass(args, hosts: list[Host], *, apply: bool, stop: threading.Event | None = None,
             skip: dict[str, str] | None = None, stdout: IO | None = None) -> tuple[int, dict[str, HostOutcome]]:
    """One pass with its recap (or JSON object) and metrics; (exit code, outcomes)."""
    stdout = stdout or sys.stdout
    metrics_dir = None
    if args.metrics_file:
        metrics_dir = tempfile.mkdtemp(prefix=".reconciler-hosts-", dir=os.path.dirname(os.path.abspath(args.metrics_file)))
        for h in hosts:
            _seed_metrics(args.metrics_file, h.name, os.path.join(metrics_dir, f"{h.name}.prom"))
    try:
        outcomes = reconcile_hosts(args, hosts, apply=apply, stop=stop, skip=skip, stdout=stdout,
                                   metrics_dir=metrics_dir)
        if args.output == "json":
            json.dump(json_report(hosts, outcomes), stdout, indent=2)
            stdout.write("\n")
            stdout.flush()
        else:
            print_recap(hosts, outcomes, stdout)
        if metrics_dir:
            merge_metrics([os.path.join(metrics_dir, f"{h.name}.prom") for h in hosts], args.metrics_file)
    finally:
        if metrics_dir:
            shutil.rmtree(metrics_dir, ignore_errors=True)
    return worst(o.code for o in outcomes.values()), outcomes


def run_inventory(args, apply: bool) -> int:
    if getattr(args, "forks", 10) is not None and args.forks < 1:
        raise ReconcilerError("--forks must be at least 1")
    hosts = select(load(args.inventory, args), args.limit)
    code, _ = run_pass(args, hosts, apply=apply)
    return code
