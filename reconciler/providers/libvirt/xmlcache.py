"""A content-addressed cache of parsed libvirt XML: what `domxml.parse_domain` and `parse_volume` made
of a document, keyed by the sha256 of the document's exact text and of the parser's own source.

Why: a no-op plan reads the same XML run after run (1,000 running VMs: 2,000 domain documents and
1,000 volume documents), and parsing them was the largest part of the read that is not an RPC
(0.3 s of GIL-bound ElementTree work at N=1,000, docs/benchmarks.md). The parse is a pure function
of the text, so a cached result is exactly what a fresh parse would return; nothing here is trusted
beyond that:
- the key covers the text and the source of domxml.py, bootxml.py and kinds/libvirt.py (what the
  parse runs) and Python's version (marshal's format): any change is a miss;
- one file per libvirt URI holds the entries its last read used, with the sha256 of the payload
  (a damaged file is ignored) and only plain values (marshal, never pickle: loading builds data and
  runs no code); entries the read no longer used are dropped when it is written again, so the file
  never outgrows the host;
- the folder is reconciler.cachedir's (0700, the user's own, off with RECONCILER_CACHE=off);
- each hit is unmarshalled afresh, so a caller that changes what it got changes no other caller's.
XMLDesc is called without VIR_DOMAIN_XML_SECURE, so no password of a domain is in what is cached.
"""
from __future__ import annotations

import hashlib
import marshal
import os
import sys
import tempfile
import threading
from pathlib import Path
from typing import Any, Callable

MAGIC = b"reconciler-libvirt-xml-1\0"
_parser: list[bytes] = []


def _parser_id() -> bytes:
    if not _parser:
        from ...kinds import libvirt as rules
        from . import bootxml, domxml
        h = hashlib.sha256(MAGIC + sys.version.encode())
        for mod in (domxml, bootxml, rules):
            h.update(Path(mod.__file__).read_bytes())
        _parser.append(h.digest())
    return _parser[0]


class ParseCache:
    """One read's view of the cache of one libvirt URI: `parse` through it (from any thread), then `save`."""

    def __init__(self, uri: str):
        from ...cachedir import folder
        self._dir = folder("libvirt-xml")
        self._old: dict[bytes, bytes] = {}
        self._used: dict[bytes, bytes] = {}
        self.hits = self.misses = 0
        self._lock = threading.Lock()      # the read's worker threads parse through one cache
        if self._dir is None:
            return
        self._file = self._dir / hashlib.sha256(_parser_id() + uri.encode()).hexdigest()
        try:
            raw = self._file.read_bytes()
        except OSError:
            return
        if not raw.startswith(MAGIC) or hashlib.sha256(raw[len(MAGIC) + 32:]).digest() != raw[len(MAGIC):len(MAGIC) + 32]:
            return
        try:
            old = marshal.loads(raw[len(MAGIC) + 32:])
        except (ValueError, EOFError, TypeError):
            return
        if isinstance(old, dict) and all(type(k) is bytes and type(v) is bytes for k, v in old.items()):
            self._old = old

    def parse(self, what: str, text: str, parser: Callable[[str], Any]) -> Any:
        """`parser(text)`, or the same value from the cache. `what` names the parser (one key space each)."""
        if self._dir is None:
            return parser(text)
        key = hashlib.sha256(what.encode() + b"\0" + text.encode("utf-8", "surrogatepass")).digest()
        blob = self._old.get(key)
        if blob is not None:
            try:
                value = marshal.loads(blob)
                with self._lock:
                    self._used[key] = blob
                    self.hits += 1
                return value
            except (ValueError, EOFError, TypeError):
                pass
        value = parser(text)
        try:
            blob = marshal.dumps(value)
        except ValueError:
            blob = None      # a value marshal cannot hold: parsed each time
        with self._lock:
            self.misses += 1
            if blob is not None:
                self._used[key] = blob
        return value

    def save(self) -> None:
        """Write the entries this read used, when they differ from what was loaded."""
        if self._dir is None or self._used.keys() == self._old.keys():
            return
        payload = marshal.dumps(self._used)
        blob = MAGIC + hashlib.sha256(payload).digest() + payload
        try:
            fd, tmp = tempfile.mkstemp(dir=self._dir, prefix=".tmp-")
            try:
                with os.fdopen(fd, "wb") as f:
                    f.write(blob)
                os.replace(tmp, self._file)     # atomic: a reader sees the whole file or the old one
            except OSError:
                os.unlink(tmp)
                raise
        except OSError:
            pass
