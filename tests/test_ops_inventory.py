"""--inventory: several hosts of this machine (libvirt's test hypervisor and qemu:///system) reconciled
in parallel, per-host lines and an Ansible-style recap, --limit, JSON, the worst exit code, merged
metrics, and a host that is down failing alone."""
from __future__ import annotations

import re

import pytest
import yaml

from helpers import cli, doc, write

pytestmark = pytest.mark.libvirt


def _samples(text: str) -> dict:
    """{(name, sorted labels): value}, read with prometheus-client's own parser."""
    from prometheus_client.parser import text_string_to_metric_families
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def inventory(tmp_path, hosts: list[dict]) -> str:
    path = tmp_path / "site" / "inventory.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"apiVersion": "reconciler/v1", "kind": "Inventory", "hosts": hosts}))
    return str(path)


def site(tmp_path, prefix, test_unix_uri, qemu_uri, *, memory="64MiB"):
    write(tmp_path / "site" / "hosts" / "a" / "vm.yaml",
          doc("VirtualMachine", f"{prefix}a", {"hypervisor": "test", "memory": memory, "vcpus": 1}))
    write(tmp_path / "site" / "hosts" / "b" / "vm.yaml",
          doc("VirtualMachine", f"{prefix}b", {"hypervisor": "qemu", "memory": memory, "vcpus": 1,
                                                "state": "shutoff", "graphics": "none"}))
    return inventory(tmp_path, [
        {"name": "edge-a", "libvirtUri": test_unix_uri, "manifests": ["hosts/a/"]},
        {"name": "edge-b", "libvirtUri": qemu_uri, "manifests": ["hosts/b"]},
    ])


def recap(out: str) -> dict:
    lines = out.split("\nRECAP\n", 1)[1].splitlines()
    got = {}
    for l in lines:
        m = re.match(r"^(\S+) : ok=(\d+) changed=(\d+) failed=(\d+) skipped=(\d+)$", l)
        assert m, f"not a recap line: {l!r}"
        got[m.group(1)] = tuple(map(int, m.groups()[1:]))
    return got


def test_two_hosts_in_parallel_apply_twice(tmp_path, prefix, test_unix_uri, qemu_uri):
    inv = site(tmp_path, prefix, test_unix_uri, qemu_uri)
    plan = cli("plan", "--inventory", inv, "--forks", "2")
    assert plan.code == 2, plan.out + plan.err
    assert f"edge-a: changed: [VirtualMachine/{prefix}a] would create" in plan.out
    assert f"edge-b: changed: [VirtualMachine/{prefix}b] would create" in plan.out

    first = cli("apply", "--inventory", inv, "--quiet")
    assert first.code == 0, first.out + first.err
    assert recap(first.out) == {"edge-a": (0, 1, 0, 0), "edge-b": (0, 1, 0, 0)}
    # Every streamed line names its host.
    assert all(l.startswith(("edge-a: ", "edge-b: ")) for l in first.out.split("\nRECAP\n")[0].splitlines() if l)
    second = cli("apply", "--inventory", inv, "--quiet")
    assert second.code == 0
    assert recap(second.out) == {"edge-a": (1, 0, 0, 0), "edge-b": (1, 0, 0, 0)}

    js = cli("plan", "--inventory", inv, "-o", "json")
    assert js.code == 0
    assert set(js.json["hosts"]) == {"edge-a", "edge-b"}
    for h in js.json["hosts"].values():
        assert h["changes"] == [] and h["summary"]["unchanged"] == 1


def test_limit_json_and_worst_exit_code(tmp_path, prefix, test_unix_uri, qemu_uri):
    inv = site(tmp_path, prefix, test_unix_uri, qemu_uri)
    only_a = cli("apply", "--inventory", inv, "--limit", "edge-a")
    assert only_a.code == 0
    assert set(recap(only_a.out)) == {"edge-a"}
    # edge-a in sync (0), edge-b pending (2): the worst is 2.
    js = cli("plan", "--inventory", inv, "-o", "json")
    assert js.code == 2
    assert js.json["hosts"]["edge-a"]["changes"] == []
    assert [c["name"] for c in js.json["hosts"]["edge-b"]["changes"]] == [f"{prefix}b"]
    assert cli("plan", "--inventory", inv, "--limit", "edge-*", "-o", "json").code == 2
    nope = cli("plan", "--inventory", inv, "--limit", "edge-z")
    assert nope.code == 1 and "matches no host" in nope.err and "edge-a, edge-b" in nope.err


def test_a_down_host_fails_alone(tmp_path, prefix, test_unix_uri, qemu_uri):
    write(tmp_path / "site" / "hosts" / "a" / "vm.yaml",
          doc("VirtualMachine", f"{prefix}a", {"hypervisor": "test", "memory": "64MiB", "vcpus": 1}))
    inv = inventory(tmp_path, [
        {"name": "edge-a", "libvirtUri": test_unix_uri, "manifests": ["hosts/a"]},
        {"name": "edge-down", "libvirtUri": f"qemu+unix:///system?socket={tmp_path}/none", "manifests": ["hosts/a"]},
    ])
    metrics = tmp_path / "m.prom"
    r = cli("apply", "--inventory", inv, "--metrics-file", str(metrics))
    assert r.code == 1                                   # the worst of 0 and 1
    assert recap(r.out) == {"edge-a": (0, 1, 0, 0), "edge-down": (0, 0, 1, 0)}
    assert "edge-down: error: cannot connect to libvirt" in r.err and "Traceback" not in r.err
    text = metrics.read_text()
    samples = _samples(text)
    assert samples[("reconciler_last_run_success", (("host", "edge-a"),))] == 1
    assert samples[("reconciler_last_run_success", (("host", "edge-down"),))] == 0
    assert text.count("# TYPE reconciler_drift gauge") == 1      # one family, both hosts' samples
    assert samples[("reconciler_changes", (("action", "create"), ("host", "edge-a"), ("kind", "VirtualMachine")))] == 1
    again = cli("apply", "--inventory", inv, "--limit", "edge-a")
    assert again.code == 0 and recap(again.out) == {"edge-a": (1, 0, 0, 0)}


def test_inventory_errors_are_one_sentence(tmp_path):
    bad = inventory(tmp_path, [{"name": "edge-1", "manifests": ["x/"], "mqttPassword": "literal"}])
    r = cli("plan", "--inventory", bad)
    assert r.code == 1 and "literal values are not allowed" in r.err and "inventory.yaml:" in r.err
    dup = inventory(tmp_path, [{"name": "e", "manifests": ["x/"]}, {"name": "e", "manifests": ["y/"]}])
    r = cli("plan", "--inventory", dup)
    assert r.code == 1 and "listed twice" in r.err
    both = cli("plan", "some/path", "--inventory", dup)
    assert both.code == 1 and "not both" in both.err
    unset = inventory(tmp_path, [{"name": "e", "manifests": ["x/"], "mqttPassword": {"fromEnv": "NOPE_UNSET_PW"}}])
    (tmp_path / "site" / "x").mkdir(exist_ok=True)
    r = cli("plan", "--inventory", unset)
    assert r.code == 1 and "e: error: host 'e': mqttPassword: environment variable NOPE_UNSET_PW is not set" in r.err


def test_watch_over_an_inventory_backs_off_the_down_host_only(tmp_path, prefix, test_unix_uri):
    import signal
    import subprocess
    import sys
    import time
    from helpers import ROOT
    write(tmp_path / "site" / "hosts" / "a" / "vm.yaml",
          doc("VirtualMachine", f"{prefix}a", {"hypervisor": "test", "memory": "64MiB", "vcpus": 1}))
    inv = inventory(tmp_path, [
        {"name": "edge-a", "libvirtUri": test_unix_uri, "manifests": ["hosts/a"]},
        {"name": "edge-down", "libvirtUri": f"qemu+unix:///system?socket={tmp_path}/none", "manifests": ["hosts/a"]},
    ])
    import os
    env = {**os.environ, "RECONCILER_LOCK_DIR": str(tmp_path / "locks"), "RECONCILER_SCOPE": "tests"}
    p = subprocess.Popen([sys.executable, "-m", "reconciler", "watch", "--inventory", inv, "--interval", "0.3s"],
                         cwd=str(ROOT), env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    time.sleep(4)
    t = time.monotonic()
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=10)
    assert p.returncode == 0 and time.monotonic() - t < 1.5
    assert "edge-down: target down (1 in a row); retrying in 0.3s" in err
    assert "edge-down: target down (2 in a row); retrying in 0.6s" in err
    assert "edge-down: skipped: target down" in out          # skipped while backing off
    assert out.count("edge-a : ok=1 changed=0") >= 2          # the healthy host keeps its interval
