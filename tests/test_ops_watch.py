"""`reconciler watch` as a real process: a manifest edited between rounds is applied, SIGTERM and
SIGINT stop it within about a second with exit code 0, and a target that is down is logged and
retried with growing delays. Also the progress display and the backoff schedule."""
from __future__ import annotations

import io
import os
import signal
import subprocess
import sys
import time

import pytest

from helpers import ROOT, cli, doc, virsh, write



def _sample(text: str, name: str) -> float:
    """The value of an unlabelled series, read with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    return next(s.value for fam in text_string_to_metric_families(text) for s in fam.samples if s.name == name)

def start(*args: str, env: dict | None = None, lock_dir=None) -> subprocess.Popen:
    e = dict(os.environ)
    e.setdefault("RECONCILER_SCOPE", "tests")
    if lock_dir is not None:
        # Other suites share test+unix:///default; an own lock folder keeps their long runs from
        # making this one wait (the objects are disjoint by prefix).
        e["RECONCILER_LOCK_DIR"] = str(lock_dir)
    e.update(env or {})
    return subprocess.Popen([sys.executable, "-m", "reconciler", *args], cwd=str(ROOT), env=e,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def stop(p: subprocess.Popen, sig=signal.SIGTERM) -> tuple[float, str, str]:
    t = time.monotonic()
    p.send_signal(sig)
    try:
        out, err = p.communicate(timeout=10)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate()
        raise AssertionError(f"watch did not stop on {sig!r}: {err}")
    return time.monotonic() - t, out, err


def wait_for(pred, timeout=30.0, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if pred():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def vm(prefix: str, description: str) -> dict:
    return doc("VirtualMachine", f"{prefix}vm", {"hypervisor": "test", "memory": "64MiB", "vcpus": 1,
                                                  "description": description})


@pytest.mark.libvirt
def test_watch_applies_edits_between_rounds_and_stops_on_sigterm(test_unix_uri, prefix, tmp_path):
    m = write(tmp_path / "repo" / "vm.yaml", vm(prefix, "first"))
    metrics = tmp_path / "reconciler.prom"
    p = start("watch", str(tmp_path / "repo"), "--libvirt-uri", test_unix_uri, "--interval", "0.5s",
              "--metrics-file", str(metrics), lock_dir=tmp_path / "locks")
    try:
        name = f"{prefix}vm"
        desc = lambda: virsh(test_unix_uri, "desc", name, check=False).strip()  # noqa: E731
        wait_for(lambda: desc() == "first", what="the first round to create the VM")
        # A `git pull` between rounds: the next round reads the new manifest.
        write(m, vm(prefix, "second"))
        wait_for(lambda: desc() == "second", what="a later round to apply the edit")
        wait_for(metrics.exists, what="the metrics file")
        time.sleep(0.3)   # mid-sleep (or mid-round): either must stop within about a second
        took, out, err = stop(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert took < 1.5, f"watch took {took:.2f}s to stop"
    assert "watch: round 1" in out and "changed: [VirtualMachine/" in out
    assert "SIGTERM" in err and "Traceback" not in err
    assert _sample(metrics.read_text(), "reconciler_last_run_success") == 1
    # Each round also writes the figures `status` writes: the VM's, beside the run series.
    from prometheus_client.parser import text_string_to_metric_families
    fams = {f.name: f for f in text_string_to_metric_families(metrics.read_text())}
    assert any(s.labels.get("vm") == f"{prefix}vm" for s in fams["reconciler_vm_managed"].samples)
    assert "reconciler_host_cpus" in fams and "reconciler_drift" in fams
    # The watch left the host as declared: two more applies change nothing.
    for _ in range(2):
        r = cli("apply", str(m), "--libvirt-uri", test_unix_uri)
        assert r.code == 0 and "changed=0" in r.recap, r.out + r.err


@pytest.mark.libvirt
def test_sigint_stops_watch_mid_sleep(test_unix_uri, prefix, tmp_path):
    write(tmp_path / "repo" / "vm.yaml", vm(prefix, "idle"))
    p = start("watch", str(tmp_path / "repo"), "--libvirt-uri", test_unix_uri, "--interval", "1h", "--quiet",
              lock_dir=tmp_path / "locks")
    try:
        wait_for(lambda: virsh(test_unix_uri, "desc", f"{prefix}vm", check=False).strip() == "idle",
                 what="the first round")
        time.sleep(0.5)
        took, out, err = stop(p, signal.SIGINT)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0, err
    assert took < 1.0, f"watch took {took:.2f}s to stop mid-sleep"
    assert "SIGINT: stopped" in err


def test_target_down_is_logged_and_retried_with_backoff(tmp_path):
    write(tmp_path / "repo" / "vm.yaml", vm("t-down-", "never"))
    metrics = tmp_path / "m.prom"
    p = start("watch", str(tmp_path / "repo"), "--libvirt-uri", f"qemu+unix:///system?socket={tmp_path}/none",
              "--interval", "0.2s", "--metrics-file", str(metrics), lock_dir=tmp_path / "locks")
    try:
        time.sleep(2.5)
        took, out, err = stop(p)
    finally:
        if p.poll() is None:
            p.kill()
            p.communicate()
    assert p.returncode == 0
    assert took < 1.5
    failed = [l for l in err.splitlines() if "failed (" in l]
    assert len(failed) >= 3, err
    assert "cannot connect to libvirt" in failed[0]
    # 0.2s, 0.4s, 0.8s, ...: each retry waits twice as long as the one before.
    assert "retrying in 0.2s" in failed[0] and "retrying in 0.4s" in failed[1] and "retrying in 0.8s" in failed[2]
    assert "Traceback" not in err
    assert _sample(metrics.read_text(), "reconciler_last_run_success") == 0


def test_backoff_schedule():
    from reconciler.watch import MAX_BACKOFF, backoff
    assert [backoff(60, n) for n in (1, 2, 3, 4, 5, 6)] == [60, 120, 240, MAX_BACKOFF, MAX_BACKOFF, MAX_BACKOFF]
    assert backoff(3600, 5) == 3600        # never below the interval itself
    assert backoff(1, 100) == MAX_BACKOFF  # no overflow


def test_watch_needs_paths_or_inventory():
    r = cli("watch")
    assert r.code == 1 and r.err.startswith("error: watch needs manifest paths")
    r = cli("watch", "x.yaml", "--interval", "0s")
    assert r.code == 1 and "--interval must be greater than zero" in r.err


# --------------------------------------------------------------------------- progress

class FakeTTY(io.StringIO):
    def isatty(self) -> bool:
        return True


def _plan(n: int):
    from reconciler.model import Action, Plan, ResourceId
    return Plan(tuple(Action("create", ResourceId("VirtualMachine", f"vm{i}"), "new") for i in range(n)))


def test_terminal_progress_spins_and_clears():
    from reconciler.model import Result
    from reconciler.progress import TerminalProgress, for_stderr
    stream = FakeTTY()
    prog = for_stderr(None, stream)
    assert isinstance(prog, TerminalProgress)
    plan = _plan(2)
    lines = []
    on = prog.wrap(lambda r: lines.append(r.action.id.name))
    prog.begin(plan)
    time.sleep(0.6)                        # a "VM boot wait": the spinner shows step 1 of 2
    on(Result(plan.steps[0], "applied"))
    on(Result(plan.steps[1], "applied"))
    prog.end()
    text = stream.getvalue()
    assert "[1/2] create VirtualMachine/vm0" in text
    assert text.endswith("\r\x1b[K")      # nothing left on the line
    assert lines == ["vm0", "vm1"]


def test_plain_progress_without_a_terminal():
    from reconciler.model import Result
    from reconciler.progress import PlainProgress, Progress, for_stderr
    from reconciler.config import Output
    stream = io.StringIO()
    assert isinstance(for_stderr(None, stream), PlainProgress)
    assert type(for_stderr(Output(quiet=True), FakeTTY())) is Progress
    prog = PlainProgress(stream, "edge-1", every=0.5)
    prog.tick = 0.05
    plan = _plan(1)
    on = prog.wrap(lambda r: None)
    prog.begin(plan)
    time.sleep(0.8)
    on(Result(plan.steps[0], "applied"))
    prog.end()
    assert stream.getvalue().startswith("edge-1: still applying: create VirtualMachine/vm0 (")
    assert "\r" not in stream.getvalue() and "\x1b" not in stream.getvalue()
