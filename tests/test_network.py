"""Network kind on qemu:///system (issue 11). Isolated networks only, with private-range addresses in
their definitions; nothing sends packets to them (the VM attached has boot [hd] and a blank disk, so it
never network-boots). DHCP hosts and ranges change live, with the same UUID and no lost link; ipv4 is
restart-class, held until --allow-restart, and the plan names the running VM attached; absent is
refused while a VM uses the network; export writes what it holds."""
from __future__ import annotations

import random
import subprocess
from pathlib import Path

import pytest
import yaml

from helpers import cli, doc, virsh, write


def _net_cleanup(uri: str, prefix: str) -> None:
    import libvirt
    conn = libvirt.open(uri)
    try:
        for net in conn.listAllNetworks(0):
            if net.name().startswith(prefix):
                try:
                    if net.isActive():
                        net.destroy()
                    net.undefine()
                except libvirt.libvirtError:
                    pass
    finally:
        conn.close()


@pytest.fixture
def netprefix(prefix, qemu_uri):
    yield prefix
    _net_cleanup(qemu_uri, prefix)


def _subnet() -> str:
    # Private, and unlikely to meet another run's or the host's: 10.231.X.0/24.
    return f"10.231.{random.randint(1, 250)}"


def _bridge_members(bridge: str) -> set[str]:
    p = subprocess.run(["ip", "-o", "link", "show", "master", bridge], capture_output=True, text=True)
    return {line.split(":")[1].strip().split("@")[0] for line in p.stdout.splitlines() if ":" in line}


def test_validate_network_rules(tmp_path):
    cases = [
        ({"mode": "isolated", "ipv4": "10.231.9.1/24", "dhcp": {"start": "10.231.10.2", "end": "10.231.9.20"}},
         "outside 10.231.9.0/24"),
        ({"mode": "isolated", "dhcp": {"start": "10.231.9.2", "end": "10.231.9.20"}}, "dhcp needs ipv4"),
        ({"mode": "bridge"}, "name it in bridge"),
        ({"mode": "bridge", "bridge": "br0", "ipv4": "10.231.9.1/24"}, "remove ipv4"),
        ({"mode": "isolated", "ipv4": "10.231.9.1/24",
          "dhcp": {"hosts": [{"mac": "52:54:00:00:00:01", "ip": "10.231.9.5"},
                             {"mac": "52:54:00:00:00:01", "ip": "10.231.9.6"}]}}, "listed twice"),
        ({"mode": "isolated", "ipv4": "10.231.9.0/24"}, "the network's own address"),
    ]
    for spec, says in cases:
        path = write(tmp_path / "n.yaml", doc("Network", "lan", spec))
        r = cli("validate", str(path))
        assert r.code == 1 and says in r.err, (spec, r.err)
        assert "n.yaml:" in r.err and "Network 'lan'" in r.err and "Traceback" not in r.err


def test_network_lifecycle_on_a_real_host(qemu_uri, netprefix, pool_dir, tmp_path):
    p = netprefix
    net, vm, bridge = f"{p}lan", f"{p}vm", f"{p[:10]}br"
    sub = _subnet()
    # A scope of its own: no other test's --prune in the shared "tests" scope can take its VM.
    env = {"RECONCILER_LIBVIRT_URI": qemu_uri, "RECONCILER_SCOPE": p.rstrip("-")}

    def manifests(net_spec: dict, vm_state: str = "running", with_vm: bool = True) -> Path:
        docs = [doc("StoragePool", f"{p}pool", {"path": pool_dir}),
                doc("Disk", f"{p}blank", {"pool": f"{p}pool", "capacity": "16MiB", "format": "qcow2"}),
                doc("Network", net, net_spec)]
        if with_vm:
            # boot from the blank disk only: nothing to boot, so no iPXE and no DHCP on the bridge.
            docs.append(doc("VirtualMachine", vm, {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1,
                                                   "state": vm_state, "boot": ["hd"],
                                                   "disks": [{"disk": f"{p}blank", "target": "vda"}],
                                                   "interfaces": [{"network": net, "model": "virtio"}]}))
        return write(tmp_path / "m" / "site.yaml", *docs)

    spec = {"mode": "isolated", "bridge": bridge, "ipv4": f"{sub}.1/24",
            "dhcp": {"start": f"{sub}.100", "end": f"{sub}.150",
                     "hosts": [{"mac": "52:54:00:aa:00:01", "ip": f"{sub}.10", "name": "gw-1"}]}}
    path = manifests(spec)
    first = cli("apply", str(path), env=env)
    assert first.code == 0, first.out + first.err
    assert f"[Network/{net}] create" in first.out
    second = cli("apply", str(path), env=env)
    assert second.code == 0 and "changed=0" in second.recap, second.out
    plan = cli("plan", str(path), "-o", "json", env=env)
    assert plan.code == 0 and plan.json["changes"] == [], plan.out

    uuid = virsh(qemu_uri, "net-uuid", net).strip()
    members = _bridge_members(bridge)
    assert members, "the VM's interface should be on the network's bridge"
    pid_file = Path(f"/run/libvirt/network/{net}.pid")
    dnsmasq = pid_file.read_text().strip() if pid_file.exists() else None

    # A new static host and a changed one: live, same UUID, the VM keeps its link, dnsmasq keeps running.
    spec["dhcp"]["hosts"] = [{"mac": "52:54:00:aa:00:01", "ip": f"{sub}.11", "name": "gw-1"},
                             {"mac": "52:54:00:aa:00:02", "ip": f"{sub}.12", "name": "gw-2"}]
    path = manifests(spec)
    plan = cli("plan", str(path), "--diff", env=env)
    assert plan.code == 2 and "spec.dhcp.hosts" in plan.out and "[live]" in plan.out, plan.out
    assert "restart" not in plan.out.split("plan:")[-1].split("restart=")[1][:1] or "restart=0" in plan.out
    r = cli("apply", str(path), env=env)
    assert r.code == 0 and "DHCP updated live" in r.out, r.out + r.err
    assert virsh(qemu_uri, "net-uuid", net).strip() == uuid
    assert _bridge_members(bridge) == members
    if dnsmasq:
        assert pid_file.read_text().strip() == dnsmasq, "dnsmasq must keep running for a host change"
    for flag in ((), ("--inactive",)):
        xml = virsh(qemu_uri, "net-dumpxml", net, *flag)
        assert f"{sub}.12" in xml and f"ip='{sub}.11'" in xml and f"ip='{sub}.10'" not in xml, (flag, xml)
    assert "changed=0" in cli("apply", str(path), env=env).recap

    # A changed range: live as well.
    spec["dhcp"]["start"], spec["dhcp"]["end"] = f"{sub}.160", f"{sub}.200"
    path = manifests(spec)
    r = cli("apply", str(path), env=env)
    assert r.code == 0 and "DHCP updated live" in r.out, r.out + r.err
    assert f"start='{sub}.160'" in virsh(qemu_uri, "net-dumpxml", net)
    assert virsh(qemu_uri, "net-uuid", net).strip() == uuid and _bridge_members(bridge) == members
    assert "changed=0" in cli("apply", str(path), env=env).recap

    # ipv4 is restart-class: the definition changes, the restart waits for --allow-restart and the
    # plan names the running VM attached.
    sub2 = _subnet()
    while sub2 == sub:
        sub2 = _subnet()
    spec2 = {"mode": "isolated", "bridge": bridge, "ipv4": f"{sub2}.1/24"}
    path = manifests(spec2)
    plan = cli("plan", str(path), env=env)
    assert plan.code == 2, plan.out + plan.err
    assert f"running VMs attached: {vm}" in plan.out, plan.out
    r = cli("apply", str(path), env=env)
    assert "rerun with --allow-restart" in r.out, r.out
    assert f"{sub2}.1" in virsh(qemu_uri, "net-dumpxml", net, "--inactive")
    assert f"{sub}.1" in virsh(qemu_uri, "net-dumpxml", net), "the running network must not restart by itself"
    r = cli("apply", str(path), "--allow-restart", env=env)
    assert r.code == 0 and f"[Network/{net}] restart" in r.out, r.out + r.err
    assert f"{sub2}.1" in virsh(qemu_uri, "net-dumpxml", net)
    assert virsh(qemu_uri, "net-uuid", net).strip() == uuid
    again = cli("apply", str(path), env=env)
    assert again.code == 0 and "changed=0" in again.recap, again.out

    # Export writes the network as declared, and what it prints plans as in sync.
    ex = cli("export", "--all", "--kind", "Network", env=env)
    assert ex.code == 0, ex.err
    mine = [d for d in yaml.safe_load_all(ex.out) if d and d["metadata"]["name"] == net]
    assert mine and mine[0]["spec"]["ipv4"] == f"{sub2}.1/24" and mine[0]["spec"]["mode"] == "isolated"
    exported = write(tmp_path / "export" / "net.yaml", mine[0])
    assert cli("plan", str(exported), "-o", "json", env=env).json["changes"] == []

    # Absent is refused while a defined VM uses it; with the VM gone it goes.
    gone = {**spec2, "state": "absent"}
    path = manifests(gone, vm_state="shutoff")
    r = cli("apply", str(path), env=env)
    assert r.code == 1 and f"still used by VirtualMachine {vm}" in r.out, r.out + r.err
    assert virsh(qemu_uri, "net-uuid", net).strip() == uuid
    path = manifests(gone, vm_state="absent")
    r = cli("apply", str(path), env=env)
    assert r.code == 0, r.out + r.err
    assert virsh(qemu_uri, "net-info", net, check=False) == ""
    assert "changed=0" in cli("apply", str(path), env=env).recap
