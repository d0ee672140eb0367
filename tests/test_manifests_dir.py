"""Every example in manifests/ is validated as it is, and applied twice for real: the libvirt part
on qemu:///system and the MQTT part on a broker of its own. Names are given the test's prefix and
paths moved to the test's folders, so the run never touches `make demo`'s objects."""
from __future__ import annotations

import re
import shutil

import pytest

from helpers import ROOT, cli, virsh
from mqtt_fixtures import login, mq  # noqa: F401  (mq is a fixture)

MANIFESTS = ROOT / "manifests"


def test_every_example_file_is_valid_on_its_own(tmp_path):
    files = sorted(MANIFESTS.glob("*.yaml"))
    assert len(files) >= 2
    for f in files:
        copy = tmp_path / f.name
        shutil.copy(f, copy)
        text = copy.read_text()
        # The demo's client passwords are files `make demo` creates; give the copy its own.
        for rel in set(re.findall(r"fromFile: (\S+?)\}", text)):
            secret = tmp_path / rel.split("/")[-1]
            secret.write_text("example-password\n")
            text = text.replace(rel, str(secret))
        copy.write_text(text)
        run = cli("validate", str(copy))
        assert run.code == 0, f"{f.name}: {run.err}"


def test_the_examples_apply_and_reapply_with_no_change(qemu_uri, prefix, pool_dir, mq, tmp_path):
    m = tmp_path / "manifests"
    m.mkdir()
    secrets = {}
    for f in sorted(MANIFESTS.glob("*.yaml")):
        text = f.read_text().replace("demo-", prefix)
        # The demo pool's folder (where libvirt keeps images) becomes the test's own.
        text = re.sub(r"path: /var/lib/libvirt/images/reconciler-demo\b", f"path: {pool_dir}", text)
        assert pool_dir in text or "kind: StoragePool" not in text, f"{f.name}: pool path not moved"
        for rel in set(re.findall(r"fromFile: (\S+?)\}", text)):
            name = rel.split("/")[-1]
            secrets[name.split(".")[0]] = mq.secret(f"pw-{prefix}{name}")
            (tmp_path / name).write_text(secrets[name.split(".")[0]])
            text = text.replace(rel, str(tmp_path / name))
        text = text.replace("edge/gw-1/config", f"edge/{prefix}gw/config")
        (m / f.name).write_text(text)
    first = mq.apply_twice(m, "--libvirt-uri", qemu_uri)
    assert "failed=0" in first.recap
    # libvirt, seen from outside.
    assert virsh(qemu_uri, "domstate", f"{prefix}gw-1").strip() == "running"
    assert f"{prefix}gw-root" in virsh(qemu_uri, "vol-list", f"{prefix}edge")
    # The broker enforces what was applied: the sensor may publish readings, the dashboard reads them.
    assert f"{prefix}sensor-01" in mq.ctrl("listClients")
    dash = login(mq.port, f"{prefix}dashboard", secrets["dashboard"])
    sensor = login(mq.port, f"{prefix}sensor-01", secrets["sensor-01"])
    try:
        assert dash.connected and sensor.connected
        assert dash.subscribe(f"edge/{prefix}gw/config") < 128
        cfg = dash.received(f"edge/{prefix}gw/config")
        assert cfg is not None and cfg.payload == b'{"interval":30,"unit":"celsius"}'
        assert sensor.publish(f"edge/{prefix}s1/data", "21.5") < 128
        assert dash.subscribe("edge/+/data") < 128
        assert sensor.publish(f"edge/{prefix}s1/data", "21.6") < 128
        assert dash.received(f"edge/{prefix}s1/data") is not None
    finally:
        dash.close()
        sensor.close()
