"""contrib/: the systemd units pass `systemd-analyze verify` (where it exists), the cron line and the CI
workflow are well formed and call the commands the docs promise."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from helpers import ROOT

CONTRIB = ROOT / "contrib"
UNITS = ["reconciler-pull.service", "reconciler-pull.timer", "reconciler-watch.service"]


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="systemd-analyze is not installed")
def test_systemd_units_verify(tmp_path):
    # verify checks that ExecStart= programs exist: point them at this checkout's entry point.
    exe = Path(sys.executable).with_name("reconciler")
    assert exe.exists()
    for name in UNITS:
        text = (CONTRIB / "systemd" / name).read_text() \
            .replace("/usr/local/bin/reconciler-pull-verified", str(CONTRIB / "pull" / "reconciler-pull-verified")) \
            .replace("/usr/local/bin/reconciler ", f"{exe} ")
        (tmp_path / name).write_text(text)
    p = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / n) for n in UNITS]],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


def test_units_pull_then_apply_and_timer_never_overlaps():
    service = (CONTRIB / "systemd" / "reconciler-pull.service").read_text()
    # The pull is reconciler-pull-verified's (signed commits only: tests/test_pull_verify.py).
    assert re.search(r"^ExecStart=/usr/local/bin/reconciler-pull-verified .* -- /usr/local/bin/reconciler apply .*--metrics-file ",
                     service, re.M)
    assert "Type=oneshot" in service
    timer = (CONTRIB / "systemd" / "reconciler-pull.timer").read_text()
    assert "OnUnitInactiveSec=" in timer and "WantedBy=timers.target" in timer
    watch = (CONTRIB / "systemd" / "reconciler-watch.service").read_text()
    assert "reconciler watch " in watch and "KillSignal=SIGTERM" in watch


def test_cron_line():
    lines = [l for l in (CONTRIB / "cron" / "reconciler").read_text().splitlines() if l and not l.startswith("#")]
    jobs = [l for l in lines if not re.match(r"^[A-Z_]+=", l)]
    assert len(jobs) == 1
    fields = jobs[0].split(None, 6)
    assert fields[:5] == ["*/5", "*", "*", "*", "*"] and fields[5] == "root"
    assert "%" not in jobs[0], "an unescaped % ends a cron command"
    assert "flock -n" in jobs[0] and "git pull --ff-only" in jobs[0] and "reconciler apply" in jobs[0]
    # The command part is valid sh.
    assert subprocess.run(["sh", "-n", "-c", fields[6].split(" >> ")[0]], timeout=10).returncode == 0


def test_ci_workflow():
    wf = yaml.safe_load((CONTRIB / "ci" / "github-actions.yml").read_text())
    jobs = wf["jobs"]
    assert set(jobs) == {"validate", "plan", "apply"}
    run = lambda job: "\n".join(s.get("run", "") for s in jobs[job]["steps"])  # noqa: E731
    assert "reconciler validate" in run("validate")
    assert jobs["plan"]["if"] == "github.event_name == 'pull_request'"
    assert "reconciler plan --inventory" in run("plan") and '"$code" = 2' in run("plan")
    assert "refs/heads/main" in jobs["apply"]["if"] and "reconciler apply --inventory" in run("apply")
    # The pull request's saved plan is the artifact the merge applies.
    assert "--out plans/" in run("plan") and "reconciler apply --inventory plans/" in run("apply")
    uploads = [s for s in jobs["plan"]["steps"] if s.get("uses", "").startswith("actions/upload-artifact")]
    downloads = [s for s in jobs["apply"]["steps"] if s.get("uses", "").startswith("actions/download-artifact")]
    assert uploads and downloads and uploads[0]["with"]["name"].startswith("plans-")
    assert jobs["apply"]["concurrency"]["cancel-in-progress"] is False
