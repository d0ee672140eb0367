"""`reconciler watch`: apply in a loop, one round every --interval, until SIGTERM or SIGINT.

- Each round re-reads the manifests (a `git pull` between rounds is picked up) and is one ordinary
  apply (run.reconcile), or one inventory pass with --inventory.
- A round whose target is down (unreachable, refused login, lock held too long) is logged on stderr
  and retried with exponential backoff: interval, 2x, 4x ... capped at max(interval, 5 min). With an
  inventory the backoff is per host: the others keep their interval, the down host is skipped (and
  says so) until its retry time. Any other failed round (a bad manifest, a failed change) is logged
  and the next round comes after the normal interval.
- SIGTERM / SIGINT: during the sleep the loop ends at once; during a round the apply stops at the
  next boundary between two actions (never inside one). If the action in flight does not finish
  within STOP_GRACE seconds the process leaves anyway: that is safe (flock locks die with the
  process, and every apply converges after an interruption, CONTRACT section 5). Exit code 0.
- The round runs in a worker thread; the main thread only waits, so a signal is handled at once.
"""
from __future__ import annotations

import os
import signal
import sys
import threading
import time
from typing import IO

from .errors import LockError, ReconcilerError, TargetError

MAX_BACKOFF = 300.0
# After a stop request, how long the action in flight may still take before the process leaves.
STOP_GRACE = 0.8
POLL = 0.05


class Stopped(ReconcilerError):
    """The apply stopped between two actions because a signal asked for it."""


def backoff(interval: float, failures: int) -> float:
    """Delay before the next try after `failures` consecutive failed rounds (failures >= 1)."""
    cap = max(interval, MAX_BACKOFF)
    return min(interval * (2 ** min(failures - 1, 30)), cap)


def _say(msg: str, stream: IO | None = None) -> None:
    stream = stream or sys.stderr
    print(f"watch: {msg}", file=stream, flush=True)


class _Round:
    """One round in a worker thread: its result or exception."""

    def __init__(self, fn):
        self.fn = fn
        self.result = None
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, name="reconciler-round", daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.result = self.fn()
        except BaseException as e:  # reported by the main thread
            self.error = e

    def done(self) -> bool:
        return not self.thread.is_alive()


def watch(args, targets, options, out) -> int:
    interval = float(args.interval)
    if interval <= 0:
        raise ReconcilerError("--interval must be greater than zero")
    stop = threading.Event()
    signalled: list[int] = []

    def on_signal(signum, frame) -> None:
        # Only a plain append here; the main loop turns it into stop.set() outside the handler.
        signalled.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if args.inventory:
            return _loop(args, interval, stop, signalled, _InventoryRounds(args, interval, stop))
        return _loop(args, interval, stop, signalled, _HostRounds(args, targets, options, out, interval, stop))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _loop(args, interval: float, stop: threading.Event, signalled: list, rounds) -> int:
    quiet = getattr(args, "quiet", False)
    n = 0
    while True:
        n += 1
        if args.output == "text" and not quiet:
            print(f"watch: round {n} at {time.strftime('%Y-%m-%d %H:%M:%S')}", flush=True)
        r = _Round(lambda: rounds.run(n))
        while not r.done():
            if signalled and not stop.is_set():
                stop.set()
                _say(f"{signal.Signals(signalled[0]).name}: stopping after the action in progress")
                deadline = time.monotonic() + STOP_GRACE
                while not r.done() and time.monotonic() < deadline:
                    time.sleep(POLL)
                if not r.done():
                    _say(f"the round did not reach a safe point within {STOP_GRACE:g}s; leaving now "
                         "(an interrupted apply converges on the next run)")
                    sys.stdout.flush()
                    sys.stderr.flush()
                    os._exit(0)
            time.sleep(POLL)
        if isinstance(r.error, Stopped) or stop.is_set():
            _say("stopped")
            return 0
        delay = rounds.after(n, r.result, r.error)
        wake = time.monotonic() + delay
        while time.monotonic() < wake:
            if signalled:
                _say(f"{signal.Signals(signalled[0]).name}: stopped")
                return 0
            time.sleep(min(POLL * 2, max(0.0, wake - time.monotonic())))


class _HostRounds:
    """Rounds against the single target given on the command line."""

    def __init__(self, args, targets, options, out, interval: float, stop: threading.Event):
        self.args, self.targets, self.options, self.out = args, targets, options, out
        self.interval, self.stop = interval, stop
        self.failures = 0

    def run(self, n: int) -> int:
        from .progress import Stoppable, for_stderr
        from .run import reconcile
        progress = Stoppable(for_stderr(self.out), self.stop, Stopped)
        return reconcile(self.args.paths, self.targets, self.options, self.out, apply=True,
                         lock_timeout=self.args.lock_timeout, progress=progress)

    def after(self, n: int, code, error) -> float:
        """Log the round's outcome; the delay before the next one."""
        if error is None:
            if self.failures:
                _say(f"round {n}: target reachable again after {self.failures} failed round(s)")
            self.failures = 0
            if code not in (0, None) and not self.args.quiet:
                _say(f"round {n} ended with exit code {code}; next round in {self.interval:g}s")
            return self.interval
        _write_failed_metrics(self.out)
        if isinstance(error, (TargetError, LockError)):
            self.failures += 1
            delay = backoff(self.interval, self.failures)
            _say(f"round {n} failed ({self.failures} in a row): {error}; retrying in {delay:g}s")
            return delay
        if isinstance(error, ReconcilerError):
            _say(f"round {n} failed: {error}; next round in {self.interval:g}s")
            return self.interval
        self.failures += 1
        delay = backoff(self.interval, self.failures)
        _say(f"round {n} failed with an internal error: {type(error).__name__}: {error}; retrying in {delay:g}s")
        if getattr(self.args, "verbose", False):
            import traceback
            traceback.print_exception(error)
        return delay


def _write_failed_metrics(out) -> None:
    """A round that failed before or while reading its targets still records last_run_success 0."""
    if out.metrics_file:
        from .report import write_metrics
        try:
            write_metrics(out.metrics_file, None, None, False, out.host)
        except OSError as e:
            _say(f"cannot write {out.metrics_file}: {e.strerror}")


class _InventoryRounds:
    """Rounds over an inventory: per-host backoff, the others keep their interval."""

    def __init__(self, args, interval: float, stop: threading.Event):
        from .inventory import load, select
        self.args, self.interval, self.stop = args, interval, stop
        self.failures: dict[str, int] = {}
        self.retry_at: dict[str, float] = {}
        self.load = lambda: select(load(args.inventory, args), args.limit)

    def run(self, n: int):
        from .inventory import run_pass
        hosts = self.load()   # re-read every round, like the manifests
        now = time.monotonic()
        skip = {h.name: f"target down {self.failures[h.name]} round(s) in a row; retrying in "
                        f"{self.retry_at[h.name] - now:.0f}s"
                for h in hosts if self.retry_at.get(h.name, 0) > now}
        return run_pass(self.args, hosts, apply=True, stop=self.stop, skip=skip)

    def after(self, n: int, result, error) -> float:
        if error is not None:
            _say(f"round {n} failed: {error}; next round in {self.interval:g}s")
            return self.interval
        code, outcomes = result
        now = time.monotonic()
        for name, o in outcomes.items():
            if o.unreachable:
                self.failures[name] = self.failures.get(name, 0) + 1
                delay = backoff(self.interval, self.failures[name])
                self.retry_at[name] = now + delay
                _say(f"{name}: target down ({self.failures[name]} in a row); retrying in {delay:g}s")
            elif o.counts.get("skipped") and name in self.retry_at and o.error is None and o.code == 1:
                continue   # skipped while backing off
            else:
                if self.failures.get(name):
                    _say(f"{name}: target reachable again")
                self.failures.pop(name, None)
                self.retry_at.pop(name, None)
        # Rounds keep their interval; a down host is skipped in the rounds before its retry time.
        return self.interval
