"""The reconciler.edge Ansible collection through a real ansible-playbook (ansible-core from PyPI): the
example contrib/ansible/examples/site.yml against an inventory of two local hosts, each with its own
real Mosquitto broker and login, covering check mode, apply, a no-op rerun (changed=0 in the PLAY
RECAP), diff mode after a drift made by hand, failing hosts beside a succeeding one, and the broker
passwords never appearing in the output at -vvv nor on the reconciler's command line."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

from helpers import ROOT, doc, unique, write
from mqtt_fixtures import Mqtt, start_broker

VENV_BIN = Path(sys.executable).parent
COLLECTIONS = ROOT / "contrib" / "ansible"
MODULE = COLLECTIONS / "ansible_collections" / "reconciler" / "edge" / "plugins" / "modules" / "reconcile.py"
SITE_YML = COLLECTIONS / "examples" / "site.yml"
RECONCILE_TASK = "Make libvirt and the broker match the manifests"
SENSOR_PASSWORD = "sensor-secret-5c1f9e"
NEW_SENSOR_PASSWORD = "sensor-secret-new-a83d07"


@pytest.fixture(autouse=True)
def _ansible_installed():
    # No skip: without ansible-core (the `test` extra) these tests fail and say why.
    assert (VENV_BIN / "ansible-playbook").exists(), "ansible-core is not installed: pip install -e '.[test]'"


@dataclass
class Play:
    code: int
    out: str
    err: str

    def recap(self, host: str) -> dict:
        m = re.search(rf"^{re.escape(host)}\s+:\s+(.*)$", self.out.split("PLAY RECAP", 1)[-1], re.M)
        assert m, f"no PLAY RECAP line for {host}:\n{self.out}"
        return {k: int(v) for k, v in re.findall(r"(\w+)=(\d+)", m.group(1))}

    def task(self, name: str) -> dict:
        """host -> ok/changed/failed/skipping of every run of the task named `name` (all serial batches)."""
        found: dict = {}
        for block in re.split(r"^(?=TASK \[|PLAY \[|PLAY RECAP)", self.out, flags=re.M):
            if block.startswith(f"TASK [{name}]"):
                for status, host in re.findall(r"^(ok|changed|failed|fatal|skipping): \[([^\]]+)\]", block, re.M):
                    found[host] = "failed" if status == "fatal" else status
        return found


class Fleet:
    """Two edge hosts of a site (h1, h2), each reconciling its own broker through the module."""

    def __init__(self, tmp: Path, brokers: dict):
        self.tmp, self.brokers = tmp, brokers
        self.prefix = unique("ans")
        self.site = tmp / "site"
        self.inv = tmp / "inventory"
        self.calls = tmp / "calls"
        self.passwords = {h: b.password for h, b in brokers.items()}
        write(self.site / "common" / "roles.yaml",
              doc("MqttRole", f"{self.prefix}-sensors", {"description": "sensor firmware",
                                                          "acls": [{"type": "publishClientSend", "topic": "edge/+/data"}]}),
              doc("MqttRole", f"{self.prefix}-readers", {"acls": [{"type": "subscribePattern", "topic": "edge/+/data"}]}))
        for h in brokers:
            write(self.site / "hosts" / h / "clients.yaml",
                  doc("MqttClient", f"{self.prefix}-{h}-sensor", {"password": {"fromEnv": "SENSOR_PASSWORD"},
                                                                  "roles": [{"name": f"{self.prefix}-sensors"}]}))
        # A reconciler that records the arguments and environment it was started with, then runs the real one.
        self.calls.mkdir()
        self.bin = tmp / "reconciler-recording"
        self.bin.write_text("#!/bin/sh\n"
                            f'd={self.calls}/$$; mkdir "$d"; printf "%s\\n" "$@" > "$d/argv"; env > "$d/env"\n'
                            f'exec {VENV_BIN / "reconciler"} "$@"\n')
        self.bin.chmod(0o755)
        self.inventory({})

    def inventory(self, passwords: dict, hosts: list[str] | None = None) -> None:
        """The inventory, with each host's broker password in its host_vars (overrides per test)."""
        hosts = hosts or list(self.brokers)
        lines = ["[edge]"]
        for h in hosts:
            lines.append(f"{h} reconciler_mqtt_url={self.brokers[h].url} reconciler_dest={self.tmp / 'dest' / h}")
        lines += ["[edge:vars]", "ansible_connection=local", f"ansible_python_interpreter={sys.executable}",
                  f"reconciler_bin={self.bin}", f"reconciler_scope={self.prefix}", "reconciler_mqtt_username=admin"]
        self.inv.mkdir(exist_ok=True)
        (self.inv / "hosts.ini").write_text("\n".join(lines) + "\n")
        (self.inv / "host_vars").mkdir(exist_ok=True)
        for h in hosts:
            pw = passwords.get(h, self.passwords[h])
            (self.inv / "host_vars" / f"{h}.yml").write_text(f"reconciler_mqtt_password: {pw!r}\n")

    def env(self) -> dict:
        t = self.tmp
        e = {k: v for k, v in os.environ.items() if not k.startswith(("ANSIBLE_", "RECONCILER_"))}
        e.update({
            # Nothing from ~/.ansible or an ansible.cfg in the working directory.
            "ANSIBLE_CONFIG": str(t / "no-ansible.cfg"), "ANSIBLE_HOME": str(t / "ansible-home"),
            "ANSIBLE_LOCAL_TEMP": str(t / "ansible-local"), "ANSIBLE_REMOTE_TEMP": str(t / "ansible-remote"),
            "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS), "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
            "ANSIBLE_NOCOLOR": "1", "ANSIBLE_FORCE_COLOR": "0", "ANSIBLE_RETRY_FILES_ENABLED": "0",
            "ANSIBLE_STDOUT_CALLBACK": "default", "ANSIBLE_HOST_KEY_CHECKING": "0", "ANSIBLE_PIPELINING": "1",
            "RECONCILER_SHUTDOWN_TIMEOUT": "1s", "SENSOR_PASSWORD": SENSOR_PASSWORD,
        })
        return e

    def play(self, *args: str, serial: int = 2, env: dict | None = None) -> Play:
        p = subprocess.run([str(VENV_BIN / "ansible-playbook"), "-i", str(self.inv / "hosts.ini"), str(SITE_YML),
                            "-e", f"reconciler_site={self.site}", "-e", f"reconciler_serial={serial}", *args],
                           capture_output=True, text=True, timeout=600, env={**self.env(), **(env or {})},
                           cwd=str(self.tmp))
        return Play(p.returncode, p.stdout, p.stderr)

    def roles(self, host: str) -> dict:
        m = Mqtt(self.brokers[host], self.tmp)
        return {r["rolename"]: r for r in m.dynsec_file().get("roles", []) if r["rolename"].startswith(self.prefix)}

    def clients(self, host: str) -> set:
        m = Mqtt(self.brokers[host], self.tmp)
        return {c["username"] for c in m.dynsec_file().get("clients", []) if c["username"].startswith(self.prefix)}


@pytest.fixture
def fleet(tmp_path):
    brokers = {}
    try:
        for h in ("h1", "h2"):
            brokers[h] = start_broker(tmp_path / f"broker-{h}")
        yield Fleet(tmp_path, brokers)
    finally:
        for b in brokers.values():
            b.stop()


def test_check_apply_rerun_and_diff_after_drift(fleet):
    # Check mode: the plan has changes, so changed=true, and nothing reaches the brokers.
    check = fleet.play("--check")
    assert check.code == 0, check.out + check.err
    assert check.task(RECONCILE_TASK) == {"h1": "changed", "h2": "changed"}, check.out
    assert fleet.roles("h1") == {} and fleet.roles("h2") == {} and fleet.clients("h1") == set()

    applied = fleet.play()
    assert applied.code == 0, applied.out + applied.err
    assert applied.task(RECONCILE_TASK) == {"h1": "changed", "h2": "changed"}, applied.out
    for h in ("h1", "h2"):
        assert set(fleet.roles(h)) == {f"{fleet.prefix}-sensors", f"{fleet.prefix}-readers"}
        assert fleet.clients(h) == {f"{fleet.prefix}-{h}-sensor"}      # each host only its own folder
        assert applied.recap(h)["failed"] == 0

    again = fleet.play()
    assert again.code == 0, again.out + again.err
    for h in ("h1", "h2"):
        assert again.recap(h)["changed"] == 0 and again.recap(h)["failed"] == 0, again.out
    assert again.task(RECONCILE_TASK) == {"h1": "ok", "h2": "ok"}

    # Drift by hand on h1's broker; --check --diff shows it as the object's before/after, h2 is in sync.
    Mqtt(fleet.brokers["h1"], fleet.tmp).ctrl("removeRoleACL", f"{fleet.prefix}-sensors", "publishClientSend", "edge/+/data")
    diff = fleet.play("--check", "--diff")
    assert diff.code == 0, diff.out + diff.err
    assert diff.task(RECONCILE_TASK) == {"h1": "changed", "h2": "ok"}, diff.out
    assert f"--- before: MqttRole/{fleet.prefix}-sensors (live)" in diff.out
    assert f"+++ after: MqttRole/{fleet.prefix}-sensors (update)" in diff.out
    assert re.search(r'^\+spec\.acls\[publishClientSend edge/\+/data\]: \{"allow": true, "priority": 0\}$', diff.out, re.M), diff.out
    assert fleet.roles("h1")[f"{fleet.prefix}-sensors"]["acls"] == []          # check mode applied nothing

    # state=planned outside check mode: also changed=true exactly when changes are pending, nothing applied.
    planned = fleet.play("-e", "reconciler_state=planned")
    assert planned.code == 0 and planned.task(RECONCILE_TASK) == {"h1": "changed", "h2": "ok"}, planned.out
    assert fleet.roles("h1")[f"{fleet.prefix}-sensors"]["acls"] == []

    fixed = fleet.play("--diff")
    assert fixed.code == 0 and fixed.task(RECONCILE_TASK) == {"h1": "changed", "h2": "ok"}, fixed.out
    assert f"+++ after: MqttRole/{fleet.prefix}-sensors (update)" in fixed.out
    assert fleet.roles("h1")[f"{fleet.prefix}-sensors"]["acls"] != []


def test_failing_host_beside_a_succeeding_one(fleet):
    # h2's broker refuses the login: h2 fails with the reconciler's own message, h1 is reconciled.
    fleet.inventory({"h2": "not-the-password"})
    r = fleet.play()
    assert r.code != 0
    assert r.task(RECONCILE_TASK) == {"h1": "changed", "h2": "failed"}, r.out
    assert re.search(r"fatal: \[h2\]: FAILED! => .*refused the login of user 'admin'", r.out), r.out
    assert r.recap("h1")["failed"] == 0 and r.recap("h2")["failed"] == 1
    assert fleet.clients("h1") == {f"{fleet.prefix}-h1-sensor"} and fleet.clients("h2") == set()

    # A bad manifest in h2's folder: the error names the file, line, kind and name; h1 is a no-op.
    fleet.inventory({})
    write(fleet.site / "hosts" / "h2" / "bad.yaml", doc("MqttRole", f"{fleet.prefix}-bad", {"colour": "red"}))
    r = fleet.play()
    assert r.task(RECONCILE_TASK) == {"h1": "ok", "h2": "failed"}, r.out
    assert re.search(rf"fatal: \[h2\]: FAILED! => .*hosts/h2/bad.yaml:\d+: MqttRole '{fleet.prefix}-bad': "
                     r"spec: unknown field 'colour'", r.out), r.out
    assert fleet.clients("h2") == set()               # bad input never touches a host
    assert r.recap("h1")["changed"] == 0 and r.recap("h1")["failed"] == 0

    # A change the reconciler refuses (a Disk in a pool that exists nowhere), in check mode: h2 fails
    # with the reconciler's reason, h1 is in sync.
    (fleet.site / "hosts" / "h2" / "bad.yaml").unlink()
    write(fleet.site / "hosts" / "h2" / "refused.yaml",
          doc("Disk", f"{fleet.prefix}-disk", {"pool": f"{fleet.prefix}-no-such-pool", "capacity": "1MiB",
                                               "format": "qcow2"}))
    r = fleet.play("--check")
    assert r.task(RECONCILE_TASK) == {"h1": "ok", "h2": "failed"}, r.out
    assert re.search(rf"fatal: \[h2\]: FAILED! => .*Disk/{fleet.prefix}-disk create: pool '{fleet.prefix}-no-such-pool' "
                     r"is neither declared nor on the host", r.out), r.out

    # serial 1 with max_fail_percentage 0: the failing first batch stops the roll-out before h1's turn.
    fleet.inventory({}, hosts=["h2", "h1"])
    Mqtt(fleet.brokers["h1"], fleet.tmp).ctrl("deleteRole", f"{fleet.prefix}-readers")
    r = fleet.play(serial=1)
    assert r.task(RECONCILE_TASK) == {"h2": "failed"}, r.out
    assert f"{fleet.prefix}-readers" not in fleet.roles("h1")
    # On h2 the apply went on with what does not depend on the refused Disk: the task failed, and
    # says it changed the host.
    assert fleet.clients("h2") == {f"{fleet.prefix}-h2-sensor"}
    fatal = next(l for l in r.out.splitlines() if l.startswith("fatal: [h2]"))
    assert '"changed": true' in fatal and "neither declared nor on the host" in fatal, fatal

    # The refused Disk removed from the repository: h1 catches up, h2 is already in sync.
    (fleet.site / "hosts" / "h2" / "refused.yaml").unlink()
    r = fleet.play()
    assert r.code == 0 and r.task(RECONCILE_TASK) == {"h1": "changed", "h2": "ok"}, r.out
    assert f"{fleet.prefix}-readers" in fleet.roles("h1")
    # The staged copy of the deleted manifest was removed from the host too.
    assert not (fleet.tmp / "dest" / "h2" / "hosts" / "h2" / "refused.yaml").exists()
    assert fleet.clients("h2") == {f"{fleet.prefix}-h2-sensor"}


def test_passwords_never_in_output_or_command_line(fleet):
    # Every client created with its password, diff on: the secret field shows, masked.
    runs = [fleet.play("-vvv", "--diff")]
    assert runs[0].code == 0, runs[0].out + runs[0].err
    assert runs[0].task(RECONCILE_TASK) == {"h1": "changed", "h2": "changed"}
    assert "+spec.password: (secret, changed)" in runs[0].out
    # A new sensor password pending (check mode) on h2, a wrong admin login on h1 (a failed task).
    fleet.inventory({"h1": "wrong-" + fleet.passwords["h1"]})
    runs.append(fleet.play("-vvv", "--check", "--diff", env={"SENSOR_PASSWORD": NEW_SENSOR_PASSWORD}))
    assert runs[1].task(RECONCILE_TASK) == {"h1": "failed", "h2": "changed"}, runs[1].out
    assert f"+++ after: MqttClient/{fleet.prefix}-h2-sensor (update)" in runs[1].out
    everything = "\n".join(r.out + r.err for r in runs)
    # The module's arguments were printed (masked) at -vvv: the scan looks where they would be.
    assert "VALUE_SPECIFIED_IN_NO_LOG_PARAMETER" in everything
    assert '"mqtt_username": "admin"' in everything
    for secret in [*fleet.passwords.values(), "wrong-" + fleet.passwords["h1"], SENSOR_PASSWORD, NEW_SENSOR_PASSWORD]:
        assert secret not in everything, "a password appeared in ansible-playbook's output"

    # What the reconciler was started with: the password only in its environment, never in argv.
    calls = sorted(fleet.calls.iterdir())
    assert len(calls) == 4
    for c in calls:
        argv = (c / "argv").read_text()
        assert "-o\njson\n" in argv
        assert not any(s in argv for s in fleet.passwords.values())
        env = (c / "env").read_text()
        assert re.search(r"^RECONCILER_MQTT_PASSWORD=\S+$", env, re.M)


def test_module_needs_only_stdlib_and_ansible():
    """The module runs on the managed host with Ansible's module_utils; it never imports the reconciler."""
    text = MODULE.read_text()
    imports = set(re.findall(r"^(?:from|import) ([\w.]+)", text, re.M))
    assert imports <= {"__future__", "json", "os", "ansible.module_utils.basic"}, imports
    assert "no_log=True" in text and "RECONCILER_MQTT_PASSWORD" in text


def test_ansible_doc_and_galaxy_build(tmp_path):
    env = {**{k: v for k, v in os.environ.items() if not k.startswith("ANSIBLE_")},
           "ANSIBLE_COLLECTIONS_PATH": str(COLLECTIONS), "ANSIBLE_HOME": str(tmp_path / "home"),
           "ANSIBLE_CONFIG": str(tmp_path / "none.cfg"), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "tmp")}
    d = subprocess.run([str(VENV_BIN / "ansible-doc"), "--json", "reconciler.edge.reconcile"], capture_output=True,
                       text=True, timeout=120, env=env)
    assert d.returncode == 0, d.stderr
    info = json.loads(d.stdout)["reconciler.edge.reconcile"]
    assert info["doc"]["options"]["mqtt_password"]["type"] == "str"
    assert {"changes", "summary", "recap"} <= set(info["return"])
    assert "reconciler.edge.reconcile:" in info["examples"]
    b = subprocess.run([str(VENV_BIN / "ansible-galaxy"), "collection", "build", "--output-path", str(tmp_path),
                        str(COLLECTIONS / "ansible_collections" / "reconciler" / "edge")],
                       capture_output=True, text=True, timeout=120, env=env)
    assert b.returncode == 0, b.stdout + b.stderr
    assert (tmp_path / "reconciler-edge-0.1.0.tar.gz").exists()
    shutil.rmtree(tmp_path / "home", ignore_errors=True)
