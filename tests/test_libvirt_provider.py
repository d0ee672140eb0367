"""The libvirt provider against libvirt's own in-process test driver (test:///default): bulk read,
each apply handler, and the read-after-apply view matching the plan. No hand-made fakes."""
from __future__ import annotations

import pytest

from reconciler import planner
from reconciler.errors import ApplyError
from reconciler.kinds import KIND_RULES
from reconciler.model import Options, Resource, ResourceId
from reconciler.providers.libvirt import LibvirtProvider


def res(kind, name, spec, labels=None):
    rules = KIND_RULES[kind]
    return Resource(ResourceId(kind, name), rules.normalise(spec), labels or {}, declared=frozenset(spec))


@pytest.fixture
def provider():
    p = LibvirtProvider("test:///default")
    yield p
    p.close()


def converge(provider, resources, options=Options(shutdown_timeout=0.5)):
    plan = planner.plan(resources, provider.read(frozenset()), options)
    for a in plan.actions:
        if not a.refused and not a.held:
            provider.apply(a, options)
    return plan


def test_read_is_bulk_and_sees_the_test_drivers_objects(provider):
    snap = provider.read(frozenset())
    vm = snap.objects[ResourceId("VirtualMachine", "test")]
    assert vm.managed is False and vm.facts["state"] == "running"
    assert vm.spec["hypervisor"] == "test"
    assert ResourceId("StoragePool", "default-pool") in snap.objects


def test_create_update_delete_round_trip(provider):
    vm = res("VirtualMachine", "p1", {"hypervisor": "test", "memory": "128MiB", "maxMemory": "256MiB", "vcpus": 1,
                                     "maxVcpus": 2, "description": "a & b", "autostart": True}, {"site": "x"})
    plan = converge(provider, [vm])
    assert [a.verb for a in plan.actions] == ["create"]
    live = provider.read(frozenset()).objects[vm.id]
    assert live.managed and live.labels == {"site": "x"} and live.spec["description"] == "a & b"
    assert live.facts["state"] == "running" and live.facts["autostart"] is True
    assert planner.plan([vm], provider.read(frozenset())).actions == ()

    vm2 = res("VirtualMachine", "p1", {"hypervisor": "test", "memory": "192MiB", "maxMemory": "256MiB", "vcpus": 2,
                                      "maxVcpus": 2, "description": "changed", "autostart": True, "state": "paused"},
              {"site": "y"})
    plan = converge(provider, [vm2])
    assert [a.verb for a in plan.actions] == ["update"]
    after = provider.read(frozenset()).objects[vm.id]
    assert after.facts["uuid"] == live.facts["uuid"]
    assert after.facts["state"] == "paused" and after.labels == {"site": "y"}
    assert planner.plan([vm2], provider.read(frozenset())).actions == ()

    gone = res("VirtualMachine", "p1", {"hypervisor": "test", "memory": "192MiB", "vcpus": 2, "state": "absent"})
    plan = converge(provider, [gone])
    assert [a.verb for a in plan.actions] == ["delete"]
    assert vm.id not in provider.read(frozenset()).objects


def test_pool_and_volume_lifecycle(provider, tmp_path):
    pool = res("StoragePool", "pp", {"path": str(tmp_path / "pp")})
    disk = res("Disk", "pp-vol", {"pool": "pp", "capacity": "10MiB", "format": "raw"})
    converge(provider, [pool, disk])
    snap = provider.read(frozenset())
    assert snap.objects[disk.id].spec["capacity"] == 10 * 2**20
    assert planner.plan([pool, disk], snap).actions == ()
    # The test driver cannot resize (qemu:///system can: tests/test_e2e_libvirt.py); the failure is
    # one clear sentence, not a traceback.
    bigger = res("Disk", "pp-vol", {"pool": "pp", "capacity": "20MiB", "format": "raw"})
    (grow,) = planner.plan([pool, bigger], provider.read(frozenset())).actions
    with pytest.raises(ApplyError, match="not supported"):
        provider.apply(grow, Options())


def test_create_adopts_a_half_made_domain_instead_of_duplicating(provider):
    """A run killed between define and start leaves an unmarked domain; the next create finishes it."""
    provider.conn.defineXML("<domain type='test'><name>half</name><memory unit='MiB'>64</memory>"
                            "<os><type arch='x86_64'>hvm</type></os></domain>")
    vm = res("VirtualMachine", "half", {"hypervisor": "test", "memory": "64MiB", "vcpus": 1})
    snap = provider.read(frozenset())
    plan = planner.plan([vm], snap, Options())
    assert [a.verb for a in plan.actions] == ["update"]  # adoption, not a second define
    converge(provider, [vm])
    live = provider.read(frozenset()).objects[vm.id]
    assert live.managed and live.facts["state"] == "running"
    assert sum(1 for d in provider.conn.listAllDomains(0) if d.name() == "half") == 1


def test_interfaces_and_graphics_on_the_test_driver(provider):
    """Networks and interfaces are tested on the test driver only (never a bridge on the real host)."""
    spec = {"hypervisor": "test", "memory": "64MiB", "vcpus": 1, "state": "shutoff",
            "interfaces": [{"network": "default", "model": "virtio"}], "graphics": "vnc"}
    vm = res("VirtualMachine", "nic1", spec)
    converge(provider, [vm])
    live = provider.read(frozenset()).objects[vm.id]
    (nic,) = live.spec["interfaces"]
    assert nic["network"] == "default" and nic["model"] == "virtio" and nic.get("mac")  # libvirt chose the MAC
    assert live.spec["graphics"] == {"type": "vnc", "listen": "127.0.0.1"}
    assert planner.plan([vm], provider.read(frozenset())).actions == ()  # a generated MAC is not drift
    # Declaring that same MAC changes nothing; another MAC, or another model, is a config change.
    same = res("VirtualMachine", "nic1", {**spec, "interfaces": [{"network": "default", "model": "virtio",
                                                                  "mac": nic["mac"]}]})
    assert planner.plan([same], provider.read(frozenset())).actions == ()
    other = res("VirtualMachine", "nic1", {**spec, "interfaces": [{"network": "default", "model": "e1000"}]})
    (a,) = planner.plan([other], provider.read(frozenset())).actions
    assert a.verb == "update" and a.fields == ["spec.interfaces"] and a.changes[0].mode == "config"
    converge(provider, [other])
    after = provider.read(frozenset()).objects[vm.id]
    assert after.spec["interfaces"][0]["model"] == "e1000"
    assert planner.plan([other], provider.read(frozenset())).actions == ()
