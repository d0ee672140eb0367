"""The benchmark machinery works end to end at a tiny size (5 VMs, no peers): manifests are generated,
created through `reconciler apply`, the no-op plan and the API floor are both run, and every figure
`make bench` reports is printed. No timing assertions: `make bench` measures, this only proves it runs."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from helpers import ROOT

pytestmark = pytest.mark.libvirt


def test_bench_runs_at_tiny_size_and_prints_every_figure(tmp_path):
    out_json = tmp_path / "bench.json"
    p = subprocess.run([sys.executable, str(ROOT / "bench" / "bench.py"), "--sizes", "3,5", "--reps", "1",
                        "--apply-n", "5", "--apply-reps", "1", "--no-peers", "--json", str(out_json),
                        "--watch-n", "5", "--watch-reps", "1", "--watch-idle", "2"],
                       capture_output=True, text=True, timeout=600, cwd=str(ROOT))
    assert p.returncode == 0, p.stdout + p.stderr
    out = p.stdout
    for heading in ("NO-OP PLAN vs API FLOOR", "WHERE THE NO-OP PLAN'S TIME GOES", "APPLY CREATING 5 VMs",
                    "STARTUP", "PEER: skipped", "TARGETS", "WATCH over N=5"):
        assert heading in out, out
    for figure in ("reconciler plan (s)", "API floor (s)", "median run's ratio", "worst run's ratio", "plan peak RSS", "N=3", "N=5"):
        assert figure in out, out
    res = json.loads(out_json.read_text())
    assert [r["n"] for r in res["scale"]] == [3, 5]
    for row in res["scale"]:
        assert row["plan_s"] > 0 and row["floor_s"] > 0 and row["plan_rss_mib"] > 0
    assert res["apply"]["vms"] == 5 and res["apply"]["floor_s"] > 0
    # Each verdict follows from its own measured figure (a bench that printed MET for a missed target
    # would be caught here; the figures themselves are make bench's business, not a test's).
    verdicts = {t["target"]: t["met"] for t in res["targets"]}
    apply_t = next(k for k in verdicts if k.startswith("apply creating 5 VMs"))
    assert verdicts[apply_t] == (res["apply"]["ratio"] <= 1.5)
    rss_t = next(k for k in verdicts if "peak RSS at N=5" in k)
    assert verdicts[rss_t] == (res["scale"][-1]["plan_rss_mib"] < 200)
    w = res["watch"]
    assert "failed" not in w, w
    assert w["vm_suspended"]["n"] == w["retained_overwritten"]["n"] == w["acl_removed"]["n"] == 1
    assert w["idle"]["seconds"] >= 2
    # Everything the bench created is gone (its objects carry the prefix it printed).
    prefix = out.split("objects prefixed '", 1)[1].split("'", 1)[0]
    listing = subprocess.run(["virsh", "-c", "test+unix:///default", "list", "--all", "--name"],
                             capture_output=True, text=True).stdout
    assert prefix not in listing
