"""`reconciler watch`: reconcile when something changes, and in any case every --interval, until
SIGTERM or SIGINT.

- Each round re-reads the manifests (a `git pull` between rounds is picked up) and is one ordinary
  apply (run.reconcile), or one inventory pass with --inventory.
- Events (like a Kubernetes informer's watch): after the first round, the targets the manifests use
  are watched on connections of their own (providers/libvirt/events.py: domain, network and pool
  events, and on a local qemu:///system the definition files; providers/mosquitto/events.py:
  retained messages on the managed topics and dynamic-security changes). An event about a declared
  object (or any object with --prune) starts a full round at once, after DEBOUNCE to gather the
  burst one command makes. A whole round, not one object's: at 1,000 VMs it takes about a second,
  inside the 2 s target, and a partial plan could disagree with a full one. The interval's round
  stays as the safety net for what sends no event (libvirt sends none for a memory or vCPU change,
  outside a local qemu:///system's definition files).
- Our own changes are not drift: an event about an object the last round acted on, arriving during
  that round or within SETTLE after it, is its echo and is dropped (a dynamic-security event has no
  object: it is dropped in the same window when the round changed anything on the broker). Should
  event-started rounds still keep changing things (a rule that never converges), after LOOP_LIMIT
  such rounds in a row, each started by an event within LOOP_GAP of the last round's end, the next
  one waits with exponential backoff: the watch never spins.
- A lost events connection is re-opened with backoff by its source, which then asks for a full round.
- A round whose target is down (unreachable, refused login, lock held too long) is logged on stderr
  and retried with exponential backoff: interval, 2x, 4x ... capped at max(interval, 5 min). With an
  inventory the backoff is per host: the others keep their interval, the down host is skipped (and
  says so) until its retry time. Any other failed round (a bad manifest, a failed change) is logged
  and the next round comes after the normal interval. An inventory is watched by interval only.
- SIGTERM / SIGINT: during the wait the loop ends at once; during a round the apply stops at the
  next boundary between two actions (never inside one). If the action in flight does not finish
  within STOP_GRACE seconds the process leaves anyway: that is safe (flock locks die with the
  process, and every apply converges after an interruption, CONTRACT section 5). Exit code 0.
- The round runs in a worker thread; the main thread sleeps in select() on one pipe that signals
  (signal.set_wakeup_fd), a finished round and every event write to: idle, it uses no CPU.
"""
from __future__ import annotations

import os
import select
import signal
import sys
import threading
import time
from dataclasses import dataclass
from typing import IO

from .config import RunConfig
from .model import ResourceId
from .outcome import Outcome

MAX_BACKOFF = 300.0
# After a stop request, how long the action in flight may still take before the process leaves.
STOP_GRACE = 0.8
# Events that follow one another this closely are one change (virsh destroy sends "stopped" then
# "undefined"...): one round for the burst.
DEBOUNCE = 0.05
# With --prune, events about objects no manifest declares (other tools' objects on a shared host)
# are gathered for longer: they can only matter if they are ours to prune.
DEBOUNCE_UNDECLARED = 1.0
# How long after a round its own changes may still come back as events (libvirt and the broker
# deliver them asynchronously).
SETTLE = 1.0
LOOP_LIMIT = 5
# Only rounds whose triggering event came within this long after the last round ended count towards
# LOOP_LIMIT: drift made by hand now and then is corrected every time, at once.
LOOP_GAP = 2.0
# How long the first round waits for the event sources to listen.
CONNECT_WAIT = 3.0
MQTT_KINDS_DYNSEC = ("MqttRole", "MqttGroup", "MqttClient", "MqttDefaults")


class Stopped(Exception):
    """The apply stopped between two actions because a signal asked for it (not a ReconcilerError:
    run.reconcile lets it through to the loop)."""


def backoff(interval: float, failures: int) -> float:
    """Delay before the next try after `failures` consecutive failed rounds (failures >= 1)."""
    cap = max(interval, MAX_BACKOFF)
    return min(interval * (2 ** min(failures - 1, 30)), cap)


def _say(msg: str, stream: IO | None = None) -> None:
    stream = stream or sys.stderr
    print(f"watch: {msg}", file=stream, flush=True)


@dataclass(frozen=True)
class Event:
    """One thing a target said changed. kind/name None: the target cannot say which object
    (a dynamic-security change). resync: a reconnected source asks for a full round."""
    at: float
    target: str
    kind: str | None
    name: str | None
    what: str
    resync: bool = False

    def label(self) -> str:
        if self.kind and self.name:
            return f"{self.kind}/{self.name} {self.what}"
        return self.what


class _Waker:
    """One pipe the main thread sleeps on: signals (set_wakeup_fd), a finished round and events
    write a byte to it."""

    def __init__(self):
        self.r, self.w = os.pipe()
        os.set_blocking(self.r, False)
        os.set_blocking(self.w, False)
        try:
            self._old = signal.set_wakeup_fd(self.w, warn_on_full_buffer=False)
            self._own = True
        except ValueError:      # not the main thread: signals are not ours to handle anyway
            self._own = False

    def poke(self) -> None:
        try:
            os.write(self.w, b".")
        except (BlockingIOError, OSError):
            pass                # full: a wake-up is pending anyway

    def wait(self, timeout: float | None) -> None:
        if timeout is not None and timeout <= 0:
            return
        select.select([self.r], [], [], timeout)
        try:
            while os.read(self.r, 4096):
                pass
        except (BlockingIOError, OSError):
            pass

    def close(self) -> None:
        if self._own:
            signal.set_wakeup_fd(self._old)
        os.close(self.r)
        os.close(self.w)


class _Inbox:
    """Events from the sources' threads, taken by the main loop."""

    def __init__(self, waker: _Waker):
        self.waker = waker
        self._lock = threading.Lock()
        self._events: list[Event] = []

    def notifier(self, target: str):
        def notify(kind: str | None, name: str | None, what: str) -> None:
            self.add(Event(time.monotonic(), target, kind, name, what))
        return notify

    def resyncer(self, target: str):
        return lambda what: self.add(Event(time.monotonic(), target, None, None, what, resync=True))

    def add(self, ev: Event) -> None:
        with self._lock:
            self._events.append(ev)
        self.waker.poke()

    def take(self) -> list[Event]:
        with self._lock:
            out, self._events = self._events, []
        return out


class _Relevance:
    """Which events start a round: about a declared object (any object with --prune), not the echo
    of the last round's own changes."""

    def __init__(self, prune: bool):
        self.prune = prune
        self.declared: set[ResourceId] = set()
        self.dynsec = False           # the manifests declare dynamic-security objects
        self.echo: dict[tuple, float] = {}
        self.echo_dynsec_until = 0.0
        # VM name -> the state the last round left it in: a lifecycle event that contradicts it is
        # a change by hand even inside the echo window (virsh destroy right after our start).
        self.left: dict[str, str] = {}
        self.ended = 0.0

    def learn(self, o: Outcome | None, ended: float) -> None:
        if o is None:
            return
        if o.plan is not None:
            self.declared = {a.id for a in o.plan.steps if a.desired is not None}
            self.dynsec = any(i.kind in MQTT_KINDS_DYNSEC or i.kind == "Topic" for i in self.declared)
        self.echo = {k: t for k, t in self.echo.items() if t >= ended}
        self.left = {}
        self.ended = ended
        until = ended + SETTLE
        for r in o.results or ():
            if r.status not in ("applied", "failed"):
                continue
            for key in _touched(r.action):
                self.echo[key] = until
            a = r.action
            if a.id.kind == "VirtualMachine" and a.desired is not None:
                self.left[a.id.name] = "absent" if a.verb == "delete" else a.desired.spec.get("state", "running")
            if r.action.id.kind in MQTT_KINDS_DYNSEC or r.action.id.kind == "Topic":
                # Topics carry their publishers' and subscribers' ACLs in the roles.
                self.echo_dynsec_until = until

    def _contradicts(self, ev: Event) -> bool:
        # During the round every event about the object is taken as ours (a restart sends "stopped").
        state = self.left.get(ev.name or "") if ev.kind == "VirtualMachine" and ev.at > self.ended else None
        return state is not None and ev.what in _CONTRADICTS.get(state, ())

    def keeps(self, ev: Event) -> bool | str:
        """False, or "declared" / "undeclared" (how long to gather)."""
        if ev.resync:
            return "declared"
        if ev.kind is None:
            if ev.at <= self.echo_dynsec_until:
                return False
            return "declared" if (self.dynsec or self.prune) else False
        if ev.at <= self.echo.get((ev.kind, ev.name), 0.0) and not self._contradicts(ev):
            return False
        if ResourceId(ev.kind, ev.name or "") in self.declared:
            return "declared"
        return "undeclared" if self.prune else False


# Lifecycle events that cannot be the echo of leaving a VM in a state.
_CONTRADICTS = {
    "running": {"stopped", "shut down", "undefined", "suspended", "crashed", "power-management suspended"},
    "paused": {"stopped", "shut down", "undefined", "resumed", "crashed"},
    "shutoff": {"started", "resumed", "suspended", "undefined"},
    "absent": {"defined", "started"},
}


def _touched(action) -> list[tuple]:
    """The objects an action changes on the target: itself, and the VM a Snapshot, Restore or
    BackupPolicy works on (their events are the VM's)."""
    keys = [(action.id.kind, action.id.name)]
    spec = action.desired.spec if action.desired is not None else {}
    vm = spec.get("vm") if hasattr(spec, "get") else None
    if isinstance(vm, str):
        keys.append(("VirtualMachine", vm))
    vms = spec.get("vms") if hasattr(spec, "get") else None
    if isinstance(vms, (list, tuple)):
        keys += [("VirtualMachine", v) for v in vms if isinstance(v, str)]
    return keys


class _Sources:
    """The event sources of the targets the manifests use: started before the first round (prime)
    or when a round first plans a target's kinds (sync), kept across rounds, stopped at the end."""

    def __init__(self, cfg: RunConfig, inbox: _Inbox):
        self.cfg, self.inbox = cfg, inbox
        self.libvirt = None
        self.broker = None
        self.quiet = cfg.output.quiet

    def prime(self, signalled: list) -> None:
        """Before the first round: the manifests' kinds start their sources, and the first round
        runs once they listen (at most CONNECT_WAIT each), so no change falls between its read and
        the subscription. A manifest error is left for the round to report."""
        from . import manifests
        from .errors import ReconcilerError
        try:
            resources = manifests.read(list(self.cfg.paths)).resources
        except ReconcilerError:
            return
        self._want({r.id.kind for r in resources}, [r.id.name for r in resources if r.id.kind == "Topic"])
        deadline = time.monotonic() + CONNECT_WAIT
        sources = [s for s in (self.libvirt, self.broker) if s is not None]
        while not signalled and time.monotonic() < deadline and not all(s.tried.is_set() for s in sources):
            time.sleep(0.02)     # start-up only; a signal must still stop the watch at once

    def sync(self, o: Outcome | None) -> None:
        """After a round: sources for targets the manifests now use, and the managed topics."""
        if o is None or o.plan is None:
            return
        steps = [a for a in o.plan.steps if a.desired is not None]
        self._want({a.id.kind for a in steps}, [a.id.name for a in steps if a.id.kind == "Topic"])

    def _want(self, kinds: set[str], topics: list[str]) -> None:
        from .kinds.registry import of_target
        t = self.cfg.targets
        if self.libvirt is None and kinds & set(of_target("libvirt")):
            from .providers.libvirt.events import LibvirtEvents
            self.libvirt = LibvirtEvents(t.libvirt_uri, self.inbox.notifier("libvirt"),
                                         self.inbox.resyncer("libvirt"), say=_say)
            self.libvirt.start()
            self._announce(self.libvirt.connected, f"libvirt at {t.libvirt_uri}")
        if self.broker is None and kinds & set(of_target("mqtt")):
            from .providers.mosquitto.events import BrokerEvents
            self.broker = BrokerEvents(t.mqtt_url, t.mqtt_username, t.mqtt_password, t.mqtt_cafile,
                                       self.inbox.notifier("mqtt"), self.inbox.resyncer("mqtt"), say=_say)
            self.broker.start()
            self._announce(self.broker.connected, f"broker {t.mqtt_url}")
        if self.broker is not None:
            self.broker.set_topics(topics)

    def _announce(self, connected: threading.Event, what: str) -> None:
        if self.quiet and not self.cfg.output.verbose:
            return

        def wait() -> None:
            if connected.wait(30):
                _say(f"watching {what} for changes")
        threading.Thread(target=wait, daemon=True).start()

    def close(self) -> None:
        for s in (self.libvirt, self.broker):
            if s is not None:
                s.stop()


class _Round:
    """One round in a worker thread: its result or exception; pokes the waker when done."""

    def __init__(self, fn, waker: _Waker):
        self.fn, self.waker = fn, waker
        self.result = None
        self.error: BaseException | None = None
        self.finished = threading.Event()
        self.thread = threading.Thread(target=self._run, name="reconciler-round", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # reported by the main thread
            self.error = e
        finally:
            # Set before the poke: the main thread, woken, must see it (the thread itself is still
            # alive for a moment after, so is_alive() would miss the wake-up).
            self.finished.set()
            self.waker.poke()

    def done(self) -> bool:
        return self.finished.is_set()


def watch(cfg: RunConfig) -> int:
    stop = threading.Event()
    signalled: list[int] = []

    def on_signal(signum, frame) -> None:
        # Only a plain append here; the main loop turns it into stop.set() outside the handler.
        signalled.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    waker = _Waker()
    sources = None
    try:
        if cfg.inventory:
            return _loop(cfg, stop, signalled, _InventoryRounds(cfg, stop), waker, None, None)
        inbox = _Inbox(waker)
        sources = _Sources(cfg, inbox)
        sources.prime(signalled)
        return _loop(cfg, stop, signalled, _HostRounds(cfg, stop), waker, inbox, sources)
    finally:
        if sources is not None:
            sources.close()
        waker.close()
        for s, h in previous.items():
            signal.signal(s, h)


def _loop(cfg: RunConfig, stop: threading.Event, signalled: list, rounds, waker: _Waker,
          inbox: _Inbox | None, sources: _Sources | None) -> int:
    relevance = _Relevance(cfg.options.prune)
    n = 0
    why = ""
    busy = 0          # event rounds in a row that changed something, each started by an event soon after the last
    while True:
        n += 1
        if cfg.output.format == "text" and not cfg.output.quiet:
            print(f"watch: round {n} at {time.strftime('%Y-%m-%d %H:%M:%S')}{why}", flush=True)
        if inbox is not None:
            inbox.take()      # whatever happened before this round, its read sees
        started = time.monotonic()
        r = _Round(lambda: rounds.run(n), waker)
        while not r.done():
            if signalled and not stop.is_set():
                stop.set()
                _say(f"{signal.Signals(signalled[0]).name}: stopping after the action in progress")
                deadline = time.monotonic() + STOP_GRACE
                while not r.done() and time.monotonic() < deadline:
                    waker.wait(deadline - time.monotonic())
                if not r.done():
                    _say(f"the round did not reach a safe point within {STOP_GRACE:g}s; leaving now "
                         "(an interrupted apply converges on the next run)")
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
                break
            waker.wait(None)
        r.thread.join()
        if isinstance(r.error, Stopped) or stop.is_set():
            _say("stopped")
            return 0
        ended = time.monotonic()
        if cfg.output.verbose:
            _say(f"round {n} took {ended - started:.2f}s")
        delay = rounds.after(n, r.result, r.error)
        outcome = r.result if isinstance(r.result, Outcome) else None
        relevance.learn(outcome, ended)
        if sources is not None:
            sources.sync(outcome)
        changed = bool(outcome and outcome.results and any(x.status == "applied" for x in outcome.results))
        busy = busy + 1 if (why and changed) else 0
        wake = time.monotonic() + delay
        why = ""
        gathered: list[Event] = []
        gather_until: float | None = None
        while True:
            if signalled:
                _say(f"{signal.Signals(signalled[0]).name}: stopped")
                return 0
            for ev in inbox.take() if inbox is not None else ():
                keep = relevance.keeps(ev)
                if cfg.output.verbose:
                    _say(f"event from {ev.target}: {ev.label()} ({'kept' if keep else 'ignored'})")
                if not keep:
                    continue
                if not gathered and ev.at - ended > LOOP_GAP:
                    busy = 0      # a change that came well after our last round is not its consequence
                if not gathered and busy >= LOOP_LIMIT:
                    hold = min(backoff(1.0, busy - LOOP_LIMIT + 1), max(cfg.interval, 1.0))
                    _say(f"events keep bringing changes ({busy} event rounds in a row changed something); "
                         f"the next event round waits {hold:g}s")
                    gather_until = ended + hold
                gathered.append(ev)
                # A burst is gathered from its first event on, so a stream of events cannot delay the round.
                due = ev.at + (DEBOUNCE if keep == "declared" else DEBOUNCE_UNDECLARED)
                gather_until = due if gather_until is None else max(gather_until, due) \
                    if busy >= LOOP_LIMIT else min(gather_until, due)
            now = time.monotonic()
            if gathered and now >= gather_until:
                why = f" ({_summary(gathered)})"
                break
            if not gathered and now >= wake:
                break
            waker.wait((gather_until if gathered else wake) - now)


def _summary(events: list[Event]) -> str:
    labels: list[str] = []
    for ev in events:
        if ev.label() not in labels:
            labels.append(ev.label())
    more = f" and {len(labels) - 3} more" if len(labels) > 3 else ""
    return ", ".join(labels[:3]) + more

class _HostRounds:
    """Rounds against the single target given on the command line."""

    def __init__(self, cfg: RunConfig, stop: threading.Event):
        self.cfg, self.stop = cfg, stop
        self.interval = cfg.interval
        self.failures = 0
        # Kept here across rounds: the metrics file is written, never read back.
        self.last_success: dict = {}

    def run(self, n: int) -> Outcome:
        from .render.show import show
        from .progress import Stoppable, for_stderr
        from .render.text import TextRenderer
        from .run import reconcile
        out = self.cfg.output
        text = TextRenderer(sys.stdout, out) if out.format == "text" else None
        progress = Stoppable(for_stderr(out), self.stop, Stopped)
        o = reconcile(list(self.cfg.paths), self.cfg.targets, self.cfg.options, apply=True,
                      lock_timeout=self.cfg.lock_timeout, progress=progress, on_result=text.result if text else None)
        show(o, out, text)
        if out.metrics_file:
            self._write_metrics(out.metrics_file, o)
        return o

    def _write_metrics(self, path: str, o: Outcome) -> None:
        """The round's run series, and beside them the VM and broker figures `status` writes (one bulk
        statistics read, no CPU sample: the counters are there, Prometheus takes the rate)."""
        from .errors import ReconcilerError
        from .render.metrics import registry_for, write_registry
        registries = [registry_for([o], self.last_success, by_host=False)]
        try:
            from .render import status_metrics
            from .status import status
            report = status([], self.cfg.targets, self.cfg.options, sample_seconds=0)
            registries.append(status_metrics.registry(report))
        except ReconcilerError as e:
            _say(f"VM and broker figures left out of {path} this round: {e}")
        try:
            write_registry(path, *registries)
        except OSError as e:
            _say(f"cannot write {path}: {e.strerror}")

    def after(self, n: int, o: Outcome | None, error) -> float:
        """Log the round's outcome; the delay before the next one."""
        if error is None and o is not None and o.error is not None:
            if o.error.unreachable:
                self.failures += 1
                delay = backoff(self.interval, self.failures)
                _say(f"round {n} failed ({self.failures} in a row): {o.error.message}; retrying in {delay:g}s")
                return delay
            _say(f"round {n} failed: {o.error.message}; next round in {self.interval:g}s")
            return self.interval
        if error is None:
            if self.failures:
                _say(f"round {n}: target reachable again after {self.failures} failed round(s)")
            self.failures = 0
            if o is not None and o.code != 0 and not self.cfg.output.quiet:
                _say(f"round {n} ended with exit code {o.code}; next round in {self.interval:g}s")
            return self.interval
        self.failures += 1
        delay = backoff(self.interval, self.failures)
        _say(f"round {n} failed with an internal error: {type(error).__name__}: {error}; retrying in {delay:g}s")
        if self.cfg.output.verbose:
            import traceback
            traceback.print_exception(error)
        return delay


class _InventoryRounds:
    """Rounds over an inventory: per-host backoff, the others keep their interval."""

    def __init__(self, cfg: RunConfig, stop: threading.Event):
        from .inventory import load, select
        self.cfg, self.stop = cfg, stop
        self.interval = cfg.interval
        self.failures: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self.last_success: dict = {}
        self.load = lambda: select(load(cfg.inventory, cfg.targets), cfg.limit)

    def run(self, n: int):
        from .inventory import run_pass
        hosts = self.load()   # re-read every round, like the manifests
        now = time.monotonic()
        skip = {h.name: f"target down {self.failures[h.name]} round(s) in a row; retrying in "
                        f"{self.retry_at[h.name] - now:.0f}s"
                for h in hosts if self.retry_at.get(h.name, 0) > now}
        return run_pass(hosts, self.cfg, apply=True, stop=self.stop, skip=skip, stopped=Stopped,
                        last_success=self.last_success)

    def after(self, n: int, outcomes, error) -> float:
        if error is not None:
            _say(f"round {n} failed: {error}; next round in {self.interval:g}s")
            return self.interval
        now = time.monotonic()
        for name, o in outcomes.items():
            if o.error is not None and o.error.unreachable:
                self.failures[name] = self.failures.get(name, 0) + 1
                delay = backoff(self.interval, self.failures[name])
                self.retry_at[name] = now + delay
                _say(f"{name}: target down ({self.failures[name]} in a row); retrying in {delay:g}s")
            elif o.skipped is not None and name in self.retry_at:
                continue   # skipped while backing off
            else:
                if self.failures.get(name):
                    _say(f"{name}: target reachable again")
                self.failures.pop(name, None)
                self.retry_at.pop(name, None)
        # Rounds keep their interval; a down host is skipped in the rounds before its retry time.
        return self.interval
