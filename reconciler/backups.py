"""`reconciler backups [--policy NAME]`: list the backups in the host's pools (time, size, VM, policy,
disks, consistency), as text or JSON. The listing is read by the libvirt provider; this module only
renders the values."""
from __future__ import annotations

import json
import sys
from typing import IO, Any

def listing(uri: str, policy: str | None = None, vm: str | None = None) -> list[dict[str, Any]]:
    """The backups on the host, oldest first: {time, vm, policy, pool, size, disks, consistency, good, problem}."""
    from .providers.libvirt.backup import list_backups
    return [b for b in list_backups(uri, policy) if vm is None or b["vm"] == vm]


def human(n: int) -> str:
    """A size for people: 264 KiB, 1.3 GiB."""
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if size < 1024 or unit == "TiB":
            return f"{size:.0f} {unit}" if unit == "B" or size >= 100 else f"{size:.1f} {unit}"
        size /= 1024
    return f"{n} B"


def render_text(rows: list[dict[str, Any]], out: IO) -> None:
    if not rows:
        print("no backups", file=out)
        return
    head = ("TIME", "SIZE", "VM", "POLICY", "DISKS", "CONSISTENCY", "POOL")
    table = [head] + [(r["time"], human(r["size"]), r["vm"], r["policy"],
                       ",".join(r["disks"]) or "-", r["consistency"] if r["good"] else f"({r['problem']})", r["pool"])
                      for r in rows]
    widths = [max(len(str(row[i])) for row in table) for i in range(len(head))]
    for row in table:
        print("  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip(), file=out)


def run_backups(libvirt_uri: str, policy: str | None = None, vm: str | None = None, output: str = "text",
                out: IO | None = None) -> int:
    out = out or sys.stdout
    rows = listing(libvirt_uri, policy, vm)
    if output == "json":
        json.dump({"backups": rows}, out, indent=2)
        out.write("\n")
    else:
        render_text(rows, out)
    return 0
