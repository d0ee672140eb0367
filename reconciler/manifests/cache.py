"""A content-addressed cache of parsed YAML (as mypy and pytest cache): the (data, first line) of each
document of a manifest file, keyed by the sha256 of the file's text and of the parser itself. Only
the parse is cached: the JSON Schema check, the kinds' rules and secret resolution run on every load,
so a cached document is checked exactly like a freshly parsed one and no secret value is ever written.

Never trusted blindly:
- the key covers the text, this parser's source code and PyYAML's version: any change is a miss;
- an entry repeats its key and carries the sha256 of its payload (a damaged or altered entry is a
  miss), and must unmarshal to a list of (dict, int) pairs, else it is ignored;
- the folder must be the user's own and closed to others (0700), else the cache is not used;
- marshal, not pickle: loading an entry can build only plain values, never run code.
At 3,410 documents the parse took 0.13 s and a warm load takes about 0.02 s (docs/benchmarks.md).
Off with RECONCILER_CACHE=off; folder: RECONCILER_CACHE_DIR, else $XDG_CACHE_HOME/reconciler, else
~/.cache/reconciler.
"""
from __future__ import annotations

import hashlib
import marshal
import os
import tempfile
import time
from pathlib import Path
from typing import Any

MAGIC = b"reconciler-yaml-1\0"
MAX_AGE = 30 * 86400          # entries unused this long are removed now and then
_state: dict[str, Any] = {}


def _folder() -> Path | None:
    if "folder" not in _state:
        from ..cachedir import folder
        _state["folder"] = folder("yaml")
    return _state["folder"]


def _parser_id() -> bytes:
    if "parser" not in _state:
        import yaml
        from . import source
        h = hashlib.sha256(MAGIC)
        h.update(Path(source.__file__).read_bytes())
        h.update(yaml.__version__.encode() + (b"C" if getattr(yaml, "__with_libyaml__", False) else b"py"))
        _state["parser"] = h.digest()
    return _state["parser"]


def _key(text: str) -> str:
    h = hashlib.sha256(_parser_id())
    h.update(text.encode("utf-8", "surrogatepass"))
    return h.hexdigest()


def load(text: str) -> list[tuple[Any, int]] | None:
    """The cached (data, line) of each document of a file with this text, or None."""
    folder = _folder()
    if folder is None:
        return None
    key = _key(text)
    try:
        raw = (folder / key).read_bytes()
    except OSError:
        return None
    head = MAGIC + key.encode()
    if not raw.startswith(head):
        return None
    payload = raw[len(head) + 32:]
    if hashlib.sha256(payload).digest() != raw[len(head):len(head) + 32]:
        return None
    try:
        value = marshal.loads(payload)
    except (ValueError, EOFError, TypeError):
        return None
    if not isinstance(value, list) or not all(
            isinstance(d, tuple) and len(d) == 2 and isinstance(d[0], dict) and type(d[1]) is int for d in value):
        return None
    return value


def store(text: str, docs: list[tuple[Any, int]]) -> None:
    """Remember a file's parse; silently nothing when the folder or a value does not allow it."""
    folder = _folder()
    if folder is None:
        return
    key = _key(text)
    try:
        payload = marshal.dumps(list(docs))
        blob = MAGIC + key.encode() + hashlib.sha256(payload).digest() + payload
    except ValueError:
        return        # a value marshal cannot hold (a YAML timestamp): parsed each time
    try:
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(blob)
            os.replace(tmp, folder / key)   # atomic: a reader sees the whole entry or none
        except OSError:
            os.unlink(tmp)
            raise
    except OSError:
        return
    if int.from_bytes(os.urandom(1), "big") < 3:     # about one store in 85: forget old entries
        _prune(folder)


def _prune(folder: Path) -> None:
    cutoff = time.time() - MAX_AGE
    try:
        for entry in os.scandir(folder):
            try:
                if entry.stat().st_mtime < cutoff:     # written then; a still-used one is simply written again
                    os.unlink(entry.path)
            except OSError:
                pass
    except OSError:
        pass
