"""Bad Snapshot, Restore and BackupPolicy documents: one sentence naming file, line, kind and name and
what to write instead; exit 1; nothing read or changed (validate is offline)."""
from __future__ import annotations

import pytest

from helpers import cli, doc, write

VM = doc("VirtualMachine", "gw", {"memory": "64MiB", "vcpus": 1})
CASES = [
    ("both sources", doc("Restore", "r", {"vm": "gw", "snapshot": "s", "backup": {"policy": "p"}}),
     "Restore 'r': spec: ", "either snapshot: NAME or backup: {policy: NAME, at: latest}"),
    ("no source", doc("Restore", "r", {"vm": "gw"}), "Restore 'r': spec: ", "either snapshot: NAME or backup"),
    ("bad every", doc("BackupPolicy", "p", {"vm": "gw", "pool": "b", "every": "soon"}),
     "BackupPolicy 'p': spec.every: 'soon'", "a duration: 30m, 24h, 7d, 1w"),
    ("bad at", doc("Restore", "r", {"vm": "gw", "backup": {"policy": "p", "at": "yesterday"}}),
     "Restore 'r': spec.backup.at: 'yesterday' is not a backup time", "2026-11-27T13:05:00Z"),
    ("unknown vm", doc("Snapshot", "s", {"vm": "nope"}), "Snapshot 's': spec.vm refers to VirtualMachine 'nope'",
     "declare it, or correct the name"),
    ("negative keep", doc("BackupPolicy", "p", {"vm": "gw", "pool": "b", "every": "1h", "keep": {"daily": -1}}),
     "BackupPolicy 'p': spec.keep.daily: -1", "minimum of 0"),
    ("unknown keep rule", doc("BackupPolicy", "p", {"vm": "gw", "pool": "b", "every": "1h", "keep": {"forever": 1}}),
     "BackupPolicy 'p': ", "forever"),
]


@pytest.mark.parametrize("what,bad,names,says", CASES, ids=[c[0] for c in CASES])
def test_bad_backup_documents(tmp_path, what, bad, names, says):
    extra = [doc("BackupPolicy", "p", {"vm": "gw", "pool": "b", "every": "1h"})] \
        if bad["kind"] == "Restore" and "backup" in bad["spec"] else []
    path = write(tmp_path / "m.yaml", VM, *extra, bad)
    r = cli("validate", str(path))
    assert r.code == 1 and r.out == ""
    (line,) = r.err.strip().splitlines()
    assert line.startswith(f"error: {path}:") and names in line and says in line, line
    assert "Traceback" not in r.err
