"""The parse cache of libvirt XML (reconciler/providers/libvirt/xmlcache.py) against libvirt's test
driver: a second read comes from it and equals a fresh read; a changed domain is parsed afresh; a
damaged or foreign file is never used; what a caller changes in a hit does not reach the next
caller; the off switch writes nothing."""
from __future__ import annotations

import os

import pytest

from reconciler import planner
from reconciler.kinds import KIND_RULES
from reconciler.model import Options, Resource, ResourceId
from reconciler.providers.libvirt import LibvirtProvider, xmlcache
from reconciler.providers.libvirt import domxml


@pytest.fixture
def folder(tmp_path, monkeypatch):
    monkeypatch.setenv("RECONCILER_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("RECONCILER_CACHE", raising=False)
    return tmp_path / "cache" / "libvirt-xml"


def counting(monkeypatch) -> list:
    calls: list = []
    real_d, real_v = domxml.parse_domain, domxml.parse_volume

    def d(x):
        calls.append("domain")
        return real_d(x)

    def v(x):
        calls.append("volume")
        return real_v(x)
    monkeypatch.setattr(domxml, "parse_domain", d)
    monkeypatch.setattr(domxml, "parse_volume", v)
    return calls


def test_a_second_read_is_served_from_the_cache_and_equals_a_fresh_one(folder, monkeypatch):
    p = LibvirtProvider("test:///default")
    try:
        calls = counting(monkeypatch)
        first = p.read(frozenset())
        parsed_first = len(calls)
        assert parsed_first >= 2 and len(list(folder.iterdir())) == 1
        second = p.read(frozenset())
        assert len(calls) == parsed_first, "every document was parsed again"
        assert second.objects == first.objects
        monkeypatch.setenv("RECONCILER_CACHE", "off")
        assert p.read(frozenset()).objects == first.objects and len(calls) == 2 * parsed_first
    finally:
        p.close()


def test_a_changed_domain_is_parsed_afresh(folder, monkeypatch):
    p = LibvirtProvider("test:///default")
    try:
        p.read(frozenset())
        dom = p.conn.lookupByName("test")
        dom.setMemoryFlags(512 * 1024, 0)      # the running domain's balloon: its live XML changes
        calls = counting(monkeypatch)
        after = p.read(frozenset()).objects[ResourceId("VirtualMachine", "test")]
        assert calls.count("domain") == 1    # only the changed document
        assert after.facts["running_spec"]["memory"] == 512 * 1024 * 1024
    finally:
        p.close()


def test_a_hit_is_a_fresh_value_each_time(folder):
    xml = LibvirtProvider("test:///default").conn.lookupByName("test").XMLDesc(0)
    c = xmlcache.ParseCache("test:///x")
    c.parse("domain", xml, domxml.parse_domain)
    c.save()
    one = xmlcache.ParseCache("test:///x")
    a = one.parse("domain", xml, domxml.parse_domain)
    a["spec"]["memory"] = -1
    b = one.parse("domain", xml, domxml.parse_domain)
    assert one.hits == 2 and b == domxml.parse_domain(xml)


@pytest.mark.parametrize("damage", ["truncate", "flip", "foreign"])
def test_a_damaged_or_planted_file_is_ignored(folder, damage):
    xml = LibvirtProvider("test:///default").conn.lookupByName("test").XMLDesc(0)
    c = xmlcache.ParseCache("test:///y")
    c.parse("domain", xml, domxml.parse_domain)
    c.save()
    (f,) = folder.iterdir()
    raw = f.read_bytes()
    if damage == "truncate":
        f.write_bytes(raw[:-10])
    elif damage == "flip":
        f.write_bytes(raw[:-1] + bytes([raw[-1] ^ 1]))
    else:
        import hashlib
        import marshal
        # A well-formed file whose entry says something else than the parser would: it must not be
        # reachable, since the key is the text's own hash and the planted value has a foreign key.
        payload = marshal.dumps({b"x" * 32: marshal.dumps({"spec": {"memory": 1}})})
        f.write_bytes(xmlcache.MAGIC + hashlib.sha256(payload).digest() + payload)
    again = xmlcache.ParseCache("test:///y")
    assert again.parse("domain", xml, domxml.parse_domain) == domxml.parse_domain(xml)
    assert again.hits == 0 and again.misses == 1


def test_a_folder_others_may_write_is_not_used(folder):
    folder.mkdir(parents=True)
    os.chmod(folder, 0o777)
    c = xmlcache.ParseCache("test:///z")
    c.parse("volume", "<volume><name>v</name><key>k</key><capacity>1</capacity><target><path>/p</path>"
                      "<format type='raw'/></target></volume>", domxml.parse_volume)
    c.save()
    assert list(folder.iterdir()) == []


def test_entries_the_host_no_longer_has_are_dropped(folder):
    xml = LibvirtProvider("test:///default").conn.lookupByName("test").XMLDesc(0)
    other = xml.replace("<name>test</name>", "<name>gone</name>")
    c = xmlcache.ParseCache("test:///w")
    c.parse("domain", xml, domxml.parse_domain)
    c.parse("domain", other, domxml.parse_domain)
    c.save()
    size_two = next(folder.iterdir()).stat().st_size
    c = xmlcache.ParseCache("test:///w")
    c.parse("domain", xml, domxml.parse_domain)
    c.save()
    assert next(folder.iterdir()).stat().st_size < size_two
    c = xmlcache.ParseCache("test:///w")
    c.parse("domain", other, domxml.parse_domain)
    assert c.hits == 0


def test_a_vm_applied_twice_plans_nothing_from_cached_documents(folder, monkeypatch):
    """Create, then apply again: the second pass changes nothing; a third read parses no document."""
    spec = {"hypervisor": "test", "memory": "128MiB", "vcpus": 1}
    vm = Resource(ResourceId("VirtualMachine", "cached-vm"), KIND_RULES["VirtualMachine"].normalise(spec), {},
                  declared=frozenset(spec))
    p = LibvirtProvider("test:///default")
    try:
        for expected in (["create"], []):
            plan = planner.plan([vm], p.read(frozenset()), Options())
            assert [a.verb for a in plan.actions] == expected
            for a in plan.actions:
                p.apply(a, Options())
        calls = counting(monkeypatch)
        assert planner.plan([vm], p.read(frozenset()), Options()).actions == ()
        assert calls == []
    finally:
        p.close()
