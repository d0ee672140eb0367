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

from .config import RunConfig
from .outcome import Outcome

MAX_BACKOFF = 300.0
# After a stop request, how long the action in flight may still take before the process leaves.
STOP_GRACE = 0.8
POLL = 0.05


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


def watch(cfg: RunConfig) -> int:
    stop = threading.Event()
    signalled: list[int] = []

    def on_signal(signum, frame) -> None:
        # Only a plain append here; the main loop turns it into stop.set() outside the handler.
        signalled.append(signum)

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    try:
        if cfg.inventory:
            return _loop(cfg, stop, signalled, _InventoryRounds(cfg, stop))
        return _loop(cfg, stop, signalled, _HostRounds(cfg, stop))
    finally:
        for s, h in previous.items():
            signal.signal(s, h)


def _loop(cfg: RunConfig, stop: threading.Event, signalled: list, rounds) -> int:
    n = 0
    while True:
        n += 1
        if cfg.output.format == "text" and not cfg.output.quiet:
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
            from .render.metrics import write_metrics
            try:
                write_metrics(out.metrics_file, [o], last_success=self.last_success)
            except OSError as e:
                _say(f"cannot write {out.metrics_file}: {e.strerror}")
        return o

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
