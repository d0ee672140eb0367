"""`plan/apply --inventory FILE`: many hosts, each one reconcile pass (run.reconcile) with its own
targets and providers, run in parallel threads (--forks), filtered by --limit. Returns one Outcome
per host; the caller renders them (per-host lines, an Ansible-style recap, one JSON object, one
metrics file). The exit code is the worst of the hosts' (1 > 2 > 0).

Every host's fields fall back to the run's targets when the inventory leaves them out
(libvirtUri -> --libvirt-uri, mqttUrl -> --mqtt-url, mqttUsername -> --mqtt-username, mqttPassword ->
RECONCILER_MQTT_PASSWORD[_FILE], mqttCafile -> --mqtt-cafile). Relative paths (manifests, a
fromFile password, mqttCafile) are relative to the inventory file's folder. The transport to a remote
host is libvirt's own (qemu+ssh://, qemu+tls://) and MQTT over TLS (mqtts://): nothing home-made.
"""
from __future__ import annotations

import fnmatch
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Callable, Protocol

from .config import RunConfig, Targets
from .errors import ManifestError, ReconcilerError
from .model import Result
from .outcome import Outcome, RunError, worst


@dataclass(frozen=True)
class Host:
    name: str
    manifests: tuple[str, ...]
    targets: Targets
    mqtt_password: dict | None = field(default=None, repr=False)   # a secret source, read when the host runs
    line: int = 0
    saved: object = None          # saved.SavedPlan: apply exactly this host's reviewed plan

    def resolved_targets(self) -> Targets:
        if self.mqtt_password is None:
            return self.targets
        from .secrets import read_secret
        try:
            return replace(self.targets, mqtt_password=read_secret(self.mqtt_password))
        except ManifestError as e:
            raise ManifestError(f"host {self.name!r}: mqttPassword: {e.message}") from None


# --------------------------------------------------------------------------- loading

def load(path: str, defaults: Targets) -> list[Host]:
    """The hosts of an Inventory file, validated against schemas/Inventory.json."""
    from .manifests import YamlSource, schema_errors, schema_message
    docs = YamlSource().documents(path)
    if len(docs) != 1:
        raise ManifestError(f"an inventory file holds exactly one document, this one has {len(docs)}", file=path)
    doc = docs[0]
    data = doc.data
    if not isinstance(data, dict) or data.get("kind") != "Inventory":
        raise ManifestError("not an Inventory (kind: Inventory, apiVersion: reconciler/v1)", file=path,
                            line=doc.line_of(("kind",)))
    errors = schema_errors("Inventory", data)
    if errors:
        err = errors[0]
        raise ManifestError(schema_message(err, "Inventory", doc), file=path, line=doc.line_of(tuple(err.absolute_path)),
                            kind="Inventory")
    base = os.path.dirname(os.path.abspath(path))

    def rel(p: str) -> str:
        return p if os.path.isabs(p) else os.path.normpath(os.path.join(base, p))

    hosts: list[Host] = []
    seen: dict[str, int] = {}
    for i, h in enumerate(data["hosts"]):
        line = doc.line_of(("hosts", i))
        if h["name"] in seen:
            raise ManifestError(f"host {h['name']!r} is listed twice (first at line {seen[h['name']]})",
                                file=path, line=line, kind="Inventory")
        seen[h["name"]] = line
        pw = h.get("mqttPassword")
        if pw is not None and "fromFile" in pw:
            pw = {"fromFile": rel(pw["fromFile"])}
        targets = Targets(h.get("libvirtUri", defaults.libvirt_uri), h.get("mqttUrl", defaults.mqtt_url),
                          h.get("mqttUsername", defaults.mqtt_username), defaults.mqtt_password,
                          rel(h["mqttCafile"]) if "mqttCafile" in h else defaults.mqtt_cafile)
        hosts.append(Host(h["name"], tuple(rel(m) for m in h["manifests"]), targets, pw, line))
    return hosts


def hosts_from_plans(directory: str, defaults: Targets) -> list[Host]:
    """`apply --inventory DIR`: one host per saved plan file that `plan --inventory ... --out DIR` wrote;
    each file names its host, targets, manifests and where its broker password comes from."""
    from . import saved
    files = sorted(os.path.join(directory, f) for f in os.listdir(directory) if f.endswith(".json"))
    if not files:
        raise ReconcilerError(f"{directory}: no saved plans (*.json) in this folder")
    hosts = []
    for f in files:
        s = saved.read(f)
        t = s.doc["target"]
        name = s.host or os.path.basename(f)[:-5]
        targets = Targets(t.get("libvirt") or defaults.libvirt_uri, t.get("mqtt") or defaults.mqtt_url,
                          t.get("mqttUsername") or defaults.mqtt_username, defaults.mqtt_password, defaults.mqtt_cafile)
        hosts.append(Host(name, tuple(s.paths), targets, t.get("mqttPasswordSource"), saved=s))
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


# --------------------------------------------------------------------------- running

class HostView(Protocol):
    """What the caller shows of one host while and after it runs."""

    def result(self, r: Result) -> None: ...

    def done(self, o: Outcome) -> None: ...


def reconcile_hosts(hosts: list[Host], cfg: RunConfig, *, apply: bool,
                    stop: threading.Event | None = None, skip: dict[str, str] | None = None,
                    view: Callable[[str], HostView] | None = None,
                    progress: Callable[[str], object] | None = None,
                    stopped: type[BaseException] | None = None) -> dict[str, Outcome]:
    """One pass over `hosts` in parallel; `skip` maps hosts to leave out this time to the reason.
    `view(host)` shows a host's results as they come and its Outcome when it ends."""
    from .run import reconcile
    skip = skip or {}
    stop = stop or threading.Event()

    def one(h: Host) -> Outcome:
        v = view(h.name) if view else None
        if h.name in skip or stop.is_set():
            o = Outcome(apply, host=h.name, skipped=skip.get(h.name, "stopping"))
        else:
            try:
                targets = h.resolved_targets()
            except ReconcilerError as e:
                o = Outcome(apply, host=h.name, error=RunError(str(e)))
            else:
                options, review = cfg.options, None
                if h.saved is not None:
                    from .saved import reviewer
                    options, review = h.saved.options(cfg.options.shutdown_timeout), reviewer(h.saved)
                try:
                    o = reconcile(list(h.manifests), targets, options, apply=apply, lock_timeout=cfg.lock_timeout,
                                  host=h.name, on_result=v.result if v else None,
                                  progress=progress(h.name) if progress else None, review=review)
                except Exception as e:  # a bug must not take the other hosts down
                    if stopped is not None and isinstance(e, stopped):
                        o = Outcome(apply, host=h.name, skipped="stopped by a signal")
                    else:
                        o = Outcome(apply, host=h.name, error=RunError(f"internal error: {type(e).__name__}: {e}"))
        if v:
            v.done(o)
        return o

    outcomes: dict[str, Outcome] = {}
    with ThreadPoolExecutor(max_workers=min(cfg.forks, len(hosts)) or 1, thread_name_prefix="host") as pool:
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


# --------------------------------------------------------------------------- showing

class _TextView:
    """One host's lines, prefixed with its name, whole lines only under a shared lock."""

    def __init__(self, name: str, cfg: RunConfig, lock: threading.Lock):
        from .render.text import TextRenderer
        self.text = TextRenderer(sys.stdout, cfg.output, host=name, lock=lock)

    def result(self, r: Result) -> None:
        self.text.result(r)

    def done(self, o: Outcome) -> None:
        self.text.finish(o)
        self.text.error(o)


def show_pass(hosts: list[Host], outcomes: dict[str, Outcome], cfg: RunConfig) -> None:
    """After the pass: the RECAP (text) or the one JSON object, and the metrics file."""
    if cfg.output.format == "json":
        from .render import jsonout
        jsonout.write({"hosts": {h.name: jsonout.outcome_json(outcomes[h.name]) for h in hosts}}, sys.stdout)
    else:
        lines = ["", "RECAP"] + [f"{h.name} : {outcomes[h.name].recap.line()}" for h in hosts]
        sys.stdout.write("\n".join(lines) + "\n")
        sys.stdout.flush()


def run_pass(hosts: list[Host], cfg: RunConfig, *, apply: bool, stop: threading.Event | None = None,
             skip: dict[str, str] | None = None, stopped: type[BaseException] | None = None,
             last_success: dict | None = None) -> dict[str, Outcome]:
    """One pass with its output: per-host lines as they come, the recap or JSON, the metrics."""
    from .progress import PlainProgress, Stoppable
    lock = threading.Lock()
    view = (lambda name: _TextView(name, cfg, lock)) if cfg.output.format == "text" else None
    json_errors = None if view else (lambda name: _JsonErrors(name, lock))

    def progress(name: str):
        p = PlainProgress(sys.stderr, name)
        return Stoppable(p, stop, stopped) if stop is not None and stopped is not None else p

    outcomes = reconcile_hosts(hosts, cfg, apply=apply, stop=stop, skip=skip, view=view or json_errors,
                               progress=progress if apply else None, stopped=stopped)
    show_pass(hosts, outcomes, cfg)
    if cfg.output.metrics_file:
        from .render.metrics import write_metrics
        try:
            write_metrics(cfg.output.metrics_file, [outcomes[h.name] for h in hosts], by_host=True,
                          last_success=last_success)
        except OSError as e:
            print(f"error: cannot write the metrics file {cfg.output.metrics_file}: {e.strerror}", file=sys.stderr)
    return outcomes


class _JsonErrors:
    """With -o json, a host's error still goes to stderr as a sentence as it happens."""

    def __init__(self, name: str, lock: threading.Lock):
        self.name, self.lock = name, lock

    def result(self, r: Result) -> None:
        pass

    def done(self, o: Outcome) -> None:
        if o.error is not None:
            with self.lock:
                print(f"{self.name}: error: {o.error.message}", file=sys.stderr, flush=True)


def run_inventory(cfg: RunConfig, apply: bool, out_dir: str | None = None) -> int:
    """`--inventory FILE` (or, for apply, a folder of saved plans); `out_dir`: save each host's plan there."""
    if os.path.isdir(cfg.inventory):
        if not apply:
            raise ReconcilerError(f"--inventory {cfg.inventory} is a folder: only `apply` takes a folder of saved plans")
        hosts = select(hosts_from_plans(cfg.inventory, cfg.targets), cfg.limit)
    else:
        hosts = select(load(cfg.inventory, cfg.targets), cfg.limit)
    outcomes = run_pass(hosts, cfg, apply=apply)
    if out_dir is not None:
        from . import saved
        for h in hosts:
            o = outcomes[h.name]
            if o.plan is not None:
                saved.write(os.path.join(out_dir, f"{h.name}.json"),
                            saved.document(o, list(h.manifests), h.targets, cfg.options, h.mqtt_password))
    return worst(o.code for o in outcomes.values())
