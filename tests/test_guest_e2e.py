"""The edge data path with a real guest (issue 11): a gateway VM, a broker account and a topic are
declared; the reconciler boots the VM (direct kernel boot, a cloud-init seed whose #! user data carries
the gateway's MQTT password from a secret source, a QEMU user-mode NIC) and the gateway's data arrives
at a declared subscriber that logs in for real. A second apply changes nothing; new user data is
swapped into the running VM's seed live and, after a reboot, the new message arrives.

The guest is a Debian kernel and a busybox initramfs built from Debian packages by
scripts/build-tiny-guest.sh (cached under .run/guest/). It reaches the test's broker, which listens on
127.0.0.1 only, at QEMU's user-network gateway 10.0.2.2: no packet touches a host interface.
Each broker is the test's own (mq fixture), so the secret scan sees every line the broker logged."""
from __future__ import annotations

import os
import subprocess
import time
import uuid
from pathlib import Path

import pytest

from helpers import ROOT, doc, write
from mqtt_fixtures import login, mq  # noqa: F401  (fixture)

# TCG on a shared 2-core machine: a boot takes 10-15 s idle, over a minute when the suite runs beside it.
BOOT_WAIT = 240.0


@pytest.fixture(scope="session")
def guest_files() -> tuple[str, str]:
    """Kernel and initramfs, built once (Debian packages only) and installed where libvirt-qemu reads."""
    p = subprocess.run(["bash", str(ROOT / "scripts" / "build-tiny-guest.sh")], capture_output=True, text=True,
                       timeout=900)
    assert p.returncode == 0, f"building the guest failed:\n{p.stdout}\n{p.stderr}"
    kernel, initrd = p.stdout.strip().splitlines()[-2:]
    assert os.path.isfile(kernel) and os.path.isfile(initrd)
    return kernel, initrd


def _user_data(port: int, client: str, token: str) -> str:
    # A gateway publishes its device data every 2 s, as a real one would; the subscriber needs only one.
    return f"""#!/bin/sh
n=0
while :; do
  n=$((n+1))
  mosquitto_pub -h 10.0.2.2 -p {port} -i {client} -u {client} -P '{{{{secret:MQTT_PASSWORD}}}}' \\
    -t edge/device/data -q 1 -m "{token} n=$n uptime=$(cut -d' ' -f1 /proc/uptime)" \\
    && echo "published {token} n=$n" || echo "publish failed"
  sleep 2
done &
"""


def _manifests(p: str, pool_dir: str, kernel: str, initrd: str, pw_file: Path, port: int, token: str,
               instance: str = "") -> list[dict]:
    gw, reader = f"{p}gw", f"{p}reader"
    meta = {"metaData": {"instance-id": instance}} if instance else {}
    return [
        doc("StoragePool", f"{p}pool", {"path": pool_dir}),
        doc("MqttRole", f"{p}gateways", {"description": "gateway firmware"}),
        doc("MqttRole", f"{p}readers", {"description": "dashboards"}),
        doc("MqttClient", gw, {"password": {"fromFile": str(pw_file)}, "clientId": gw,
                               "roles": [{"name": f"{p}gateways"}]}),
        doc("MqttClient", reader, {"password": {"fromEnv": "GUEST_READER_PW"}, "roles": [{"name": f"{p}readers"}]}),
        doc("Topic", "edge/device/data", {"publishers": [f"{p}gateways"], "subscribers": [f"{p}readers"]}),
        doc("VirtualMachine", gw, {
            "hypervisor": "qemu", "memory": "256MiB", "vcpus": 1,
            "kernel": {"path": kernel, "initrd": initrd, "cmdline": "console=ttyS0 quiet"},
            "cloudInit": {"pool": f"{p}pool", "userData": _user_data(port, gw, token),
                          "secrets": {"MQTT_PASSWORD": {"fromFile": str(pw_file)}}, **meta},
            "interfaces": [{"user": True, "model": "virtio"}],
        }),
    ]


def _wait_for(sub, token: str, timeout: float):
    """The first message on edge/device/data that carries `token`, or None."""
    end = time.monotonic() + timeout
    with sub.cond:
        while True:
            m = next((m for m in sub.messages if m.topic == "edge/device/data" and m.payload.decode().startswith(token)),
                     None)
            if m is not None:
                return m
            left = end - time.monotonic()
            if left <= 0:
                return None
            sub.cond.wait(left)


def _domain(name: str):
    import libvirt
    return libvirt.open("qemu:///system").lookupByName(name)


def test_gateway_boots_and_its_data_arrives(prefix, pool_dir, guest_files, mq, tmp_path):  # noqa: F811
    kernel, initrd = guest_files
    p = prefix
    gw_pw = mq.secret("gw-" + uuid.uuid4().hex)
    reader_pw = mq.secret("rd-" + uuid.uuid4().hex)
    pw_file = tmp_path / "gw.password"
    pw_file.write_text(gw_pw + "\n")
    pw_file.chmod(0o600)
    # A scope of its own: another test's `apply --prune` in the shared "tests" scope must not take the VM.
    env = {"GUEST_READER_PW": reader_pw, "RECONCILER_SCOPE": p.rstrip("-")}
    token1 = f"{p}boot-1"
    path = write(tmp_path / "site" / "edge.yaml", *_manifests(p, pool_dir, kernel, initrd, pw_file, mq.port, token1))

    r = mq.run("validate", str(path), env=env)
    assert r.code == 0, r.out + r.err

    t0 = time.monotonic()
    first = mq.run("apply", str(path), env=env)
    t_applied = time.monotonic() - t0
    assert first.code == 0, first.out + first.err
    assert f"[VirtualMachine/{p}gw] create" in first.out

    # The declared subscriber, logged in with its declared password, on the declared topic.
    sub = login(mq.port, f"{p}reader", reader_pw)
    try:
        assert sub.connected, f"the declared reader could not log in: {sub.connack}"
        assert sub.subscribe("edge/device/data") < 0x80, "the Topic's subscriber role was not granted"
        m1 = _wait_for(sub, token1, BOOT_WAIT)
        t_first = time.monotonic() - t0
        assert m1 is not None, f"no message from the guest within {BOOT_WAIT:g}s:\n" + _console(p)
        guest_uptime = float(m1.payload.decode().split("uptime=")[1])

        # Idempotent: the second apply and a plan change nothing.
        second = mq.run("apply", str(path), env=env)
        assert second.code == 0 and "changed=0" in second.recap and "failed=0" in second.recap, second.out
        plan = mq.run("plan", str(path), "-o", "json", env=env)
        assert plan.code == 0 and plan.json["changes"] == [], plan.out

        # Nothing of the password is in the domain's definition: it lives in the seed volume only.
        dom = _domain(f"{p}gw")
        uuid_before = dom.UUIDString()
        assert gw_pw not in dom.XMLDesc(0)
        seed_path = Path(pool_dir) / f"{p}gw-cidata"
        assert seed_path.is_file()

        # New user data: the plan shows digests and when cloud-init reads it; apply swaps the media live.
        token2 = f"{p}boot-2"
        write(path, *_manifests(p, pool_dir, kernel, initrd, pw_file, mq.port, token2))
        plan = mq.run("plan", str(path), "--diff", env=env)
        assert plan.code == 2, plan.out + plan.err
        assert "spec.cloudInit: sha256:" in plan.out and "-> sha256:" in plan.out, plan.out
        assert "instance-id" in plan.out, plan.out
        third = mq.run("apply", str(path), env=env)
        assert third.code == 0, third.out + third.err
        assert "new media inserted live" in third.out, third.out
        dom = _domain(f"{p}gw")
        assert dom.UUIDString() == uuid_before and dom.isActive(), "the seed swap must keep the running domain"
        again = mq.run("apply", str(path), env=env)
        assert "changed=0" in again.recap, again.out

        # The guest reads its seed at boot: after a reboot the new message arrives.
        t1 = time.monotonic()
        dom.reset(0)
        m2 = _wait_for(sub, token2, BOOT_WAIT)
        t_second = time.monotonic() - t1
        assert m2 is not None, f"no new message within {BOOT_WAIT:g}s of the reboot:\n" + _console(p)
    finally:
        sub.close()

    print(f"\nguest: apply {t_applied:.1f}s; first message {t_first:.1f}s after apply started "
          f"(guest uptime at publish {guest_uptime:.1f}s); after new user data and a reboot {t_second:.1f}s")

    # The seed goes when the VM goes.
    gone = write(tmp_path / "site" / "edge.yaml",
                 *[d if d["kind"] != "VirtualMachine" else {**d, "spec": {**d["spec"], "state": "absent"}}
                   for d in _manifests(p, pool_dir, kernel, initrd, pw_file, mq.port, token2)])
    r = mq.run("apply", str(gone), env=env)
    assert r.code == 0, r.out + r.err
    assert not seed_path.exists(), "the seed volume outlived its VM"
    r = mq.run("apply", str(gone), env=env)
    assert "changed=0" in r.recap, r.out


def _console(p: str) -> str:
    """The guest's serial console as QEMU logged it, for a failure message."""
    log = Path(f"/var/log/libvirt/qemu/{p}gw.log")
    return log.read_text(errors="replace")[-3000:] if log.exists() else "(no QEMU log)"
