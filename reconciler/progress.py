"""Progress of a long apply, on stderr: a one-line spinner and counter when stderr is a terminal
(`[3/12] VirtualMachine/gw-1 12s`), and otherwise a plain line only when one action runs for long
(`still applying VirtualMachine/gw-1 (30s, step 3 of 12)`), so that logs stay readable.

A progress object sees the plan before the applier starts (`begin`), every result as it comes
(`wrap` a result callback) and the end (`end`). The applier produces exactly one result per plan
step, in order, so the step running now is `plan.steps[len(results so far)]`.
`Progress` itself does nothing; `for_stderr(out)` picks the right one for an Output.
"""
from __future__ import annotations

import sys
import threading
import time
from typing import IO, Callable

SPIN = "|/-\\"
# A terminal spinner appears only once an action has run this long (fast runs never flicker).
SHOW_AFTER = 0.3
# Without a terminal, a plain line every this many seconds while one action runs.
PLAIN_EVERY = 30.0


class Progress:
    """No progress display."""

    def begin(self, plan) -> None:
        pass

    def wrap(self, on_result: Callable) -> Callable:
        return on_result

    def end(self) -> None:
        pass


class _Ticker(Progress):
    """Shared machinery: a daemon thread that ticks while the apply runs."""

    tick = 0.1

    def __init__(self, stream: IO, host: str | None = None):
        self.stream = stream
        self.prefix = f"{host}: " if host else ""
        self.lock = threading.Lock()
        self.steps: tuple = ()
        self.done = 0
        self.since = time.monotonic()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def begin(self, plan) -> None:
        self.steps = tuple(plan.steps)
        self.done = 0
        self.since = time.monotonic()
        if any(a.verb != "noop" for a in self.steps):
            self._stop.clear()
            self._thread = threading.Thread(target=self._run, name="reconciler-progress", daemon=True)
            self._thread.start()

    def wrap(self, on_result: Callable) -> Callable:
        def wrapped(result) -> None:
            with self.lock:
                self.clear()
                try:
                    on_result(result)
                finally:
                    self.done += 1
                    self.since = time.monotonic()
        return wrapped

    def end(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(1.0)
            self._thread = None
        with self.lock:
            self.clear()

    def current(self):
        return self.steps[self.done] if self.done < len(self.steps) else None

    def _run(self) -> None:
        n = 0
        while not self._stop.wait(self.tick):
            n += 1
            with self.lock:
                a = self.current()
                if a is not None:
                    self.show(a, time.monotonic() - self.since, n)

    def clear(self) -> None:
        pass

    def show(self, action, elapsed: float, n: int) -> None:
        raise NotImplementedError


class TerminalProgress(_Ticker):
    """A spinner line on a terminal, erased before every output line and at the end."""

    def __init__(self, stream: IO, host: str | None = None):
        super().__init__(stream, host)
        self.shown = False

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False

    def show(self, action, elapsed: float, n: int) -> None:
        if elapsed < SHOW_AFTER or action.verb == "noop":
            return
        what = f"{action.verb} {action.id}"
        self.stream.write(f"\r\x1b[K{SPIN[n % len(SPIN)]} {self.prefix}[{self.done + 1}/{len(self.steps)}] "
                          f"{what} {elapsed:.0f}s")
        self.stream.flush()
        self.shown = True


class PlainProgress(_Ticker):
    """No terminal: one plain line per PLAIN_EVERY seconds of a single long action."""

    tick = 1.0

    def __init__(self, stream: IO, host: str | None = None, every: float = PLAIN_EVERY):
        super().__init__(stream, host)
        self.every = every
        self.told = 0

    def wrap(self, on_result: Callable) -> Callable:
        inner = super().wrap(on_result)

        def wrapped(result) -> None:
            inner(result)
            self.told = 0
        return wrapped

    def show(self, action, elapsed: float, n: int) -> None:
        if action.verb == "noop" or elapsed < self.every * (self.told + 1):
            return
        self.told += 1
        print(f"{self.prefix}still applying: {action.verb} {action.id} ({elapsed:.0f}s, step "
              f"{self.done + 1} of {len(self.steps)})", file=self.stream, flush=True)


def for_stderr(out=None, stream: IO | None = None) -> Progress:
    """The progress display for an Output: none with --quiet or -o json on a pipe, a spinner on a
    terminal, plain lines otherwise."""
    stream = stream or sys.stderr
    host = getattr(out, "host", None)
    if out is not None and getattr(out, "quiet", False):
        return Progress()
    try:
        tty = stream.isatty()
    except (AttributeError, ValueError):
        tty = False
    if tty:
        return TerminalProgress(stream, host)
    return PlainProgress(stream, host)


class Stoppable(Progress):
    """Wraps another progress; once `stop` is set, the next result ends the apply with Stopped,
    so a stop request lands between two actions and never in the middle of one."""

    def __init__(self, inner: Progress, stop: threading.Event, exc: type[BaseException]):
        self.inner, self.stop, self.exc = inner, stop, exc

    def begin(self, plan) -> None:
        if self.stop.is_set():
            raise self.exc("stopped by a signal before the apply began")
        self.inner.begin(plan)

    def wrap(self, on_result: Callable) -> Callable:
        inner = self.inner.wrap(on_result)

        def wrapped(result) -> None:
            inner(result)
            if self.stop.is_set():
                raise self.exc("stopped by a signal between two actions")
        return wrapped

    def end(self) -> None:
        self.inner.end()
