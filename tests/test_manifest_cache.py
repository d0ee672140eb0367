"""The parse cache (reconciler/manifests/cache.py): a second load of the same text comes from it and
equals a fresh parse; any change of the text is a miss; a damaged, foreign or planted entry is never
used; an error in a cached document still names its line; no secret value is ever written to it."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from helpers import ROOT, doc, write


@pytest.fixture
def cache(tmp_path, monkeypatch):
    from reconciler.manifests import cache as c
    folder = tmp_path / "cache"
    monkeypatch.setenv("RECONCILER_CACHE_DIR", str(folder))
    monkeypatch.delenv("RECONCILER_CACHE", raising=False)
    c._state.clear()
    yield folder / "yaml"
    c._state.clear()


def _parses(monkeypatch) -> list:
    """Count the real parses (YamlSource._fast calls)."""
    from reconciler.manifests.source import YamlSource
    calls: list = []
    real = YamlSource._fast

    def counting(self, text):
        calls.append(text)
        return real(self, text)
    monkeypatch.setattr(YamlSource, "_fast", counting)
    return calls


def vm(name: str, memory: str = "64MiB") -> dict:
    return doc("VirtualMachine", name, {"hypervisor": "test", "memory": memory, "vcpus": 1})


def test_second_load_comes_from_the_cache_and_equals_a_fresh_parse(cache, tmp_path, monkeypatch):
    from reconciler import manifests
    path = write(tmp_path / "m" / "vms.yaml", vm("a"), vm("b"))
    calls = _parses(monkeypatch)
    first = manifests.read([str(path)])
    assert len(calls) == 1 and len(list(cache.iterdir())) == 1
    second = manifests.read([str(path)])
    assert len(calls) == 1, "the second load parsed again"
    assert second.resources == first.resources and second.digest == first.digest
    # A changed text is another key: parsed again, never the old entry.
    write(path, vm("a", "128MiB"), vm("b"))
    third = manifests.read([str(path)])
    assert len(calls) == 2
    assert dict(third.resources[0].spec)["memory"] != dict(first.resources[0].spec)["memory"]


def test_damaged_or_planted_entries_are_ignored(cache, tmp_path, monkeypatch):
    from reconciler import manifests
    from reconciler.manifests import cache as c
    path = write(tmp_path / "m" / "vm.yaml", vm("a"))
    good = manifests.read([str(path)]).resources
    (entry,) = cache.iterdir()
    for damage in (b"", entry.read_bytes()[:-7], c.MAGIC + b"0" * 64 + b"junk",
                   entry.read_bytes().replace(b"64MiB", b"99MiB")):
        entry.write_bytes(damage)
        calls = _parses(monkeypatch)
        assert manifests.read([str(path)]).resources == good
        assert len(calls) == 1, damage[:40]
    # A planted entry under the right key but with another key inside: refused.
    key = entry.name
    import hashlib
    import marshal
    payload = marshal.dumps([({"kind": "x"}, 1)])
    entry.write_bytes(c.MAGIC + ("f" * 64).encode() + hashlib.sha256(payload).digest() + payload)
    assert manifests.read([str(path)]).resources == good
    assert key == entry.name


def test_a_folder_others_may_write_is_not_used(cache, tmp_path, monkeypatch):
    from reconciler import manifests
    path = write(tmp_path / "m" / "vm.yaml", vm("a"))
    cache.mkdir(parents=True)
    os.chmod(cache, 0o777)
    calls = _parses(monkeypatch)
    manifests.read([str(path)])
    manifests.read([str(path)])
    assert len(calls) == 2 and list(cache.iterdir()) == []


def test_off_switch(cache, tmp_path, monkeypatch):
    from reconciler import manifests
    monkeypatch.setenv("RECONCILER_CACHE", "off")
    path = write(tmp_path / "m" / "vm.yaml", vm("a"))
    calls = _parses(monkeypatch)
    manifests.read([str(path)])
    manifests.read([str(path)])
    assert len(calls) == 2 and not cache.exists()


def test_cached_documents_are_checked_again_with_lines_and_no_secret_is_stored(tmp_path):
    """Through the CLI: a bad document reported at its line from a warm cache; the value of a
    password read from the environment is in no cache entry."""
    env = dict(os.environ, RECONCILER_CACHE_DIR=str(tmp_path / "cache"), CACHE_TEST_PW="s3cret-value-42")
    env.pop("RECONCILER_CACHE", None)
    good = doc("MqttClient", "dev", {"password": {"fromEnv": "CACHE_TEST_PW"}})
    bad = vm("a")
    bad["spec"]["vcpus"] = "many"
    path = write(tmp_path / "m" / "x.yaml", good, bad)
    outs = []
    for _ in range(2):        # cold, then warm
        p = subprocess.run([sys.executable, "-m", "reconciler", "validate", str(path)], capture_output=True,
                           text=True, env=env, cwd=str(ROOT))
        outs.append((p.returncode, p.stderr))
    assert outs[0] == outs[1], outs
    code, err = outs[1]
    line = next(i for i, l in enumerate(path.read_text().splitlines(), 1) if "vcpus: many" in l)
    assert code == 1 and err.startswith(f"error: {path}:{line}: VirtualMachine 'a': spec.vcpus"), err
    assert "Traceback" not in err
    entries = list((tmp_path / "cache" / "yaml").iterdir())
    assert entries
    assert all(b"s3cret-value-42" not in e.read_bytes() for e in entries)
