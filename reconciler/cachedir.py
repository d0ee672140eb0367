"""Where reconciler keeps its caches, and whether that folder may be trusted. One folder per cache
under RECONCILER_CACHE_DIR, else $XDG_CACHE_HOME/reconciler, else ~/.cache/reconciler; none at all
with RECONCILER_CACHE=off. A folder that is not the user's own or that others may write to is not
used (its entries could be planted): the caller then simply works without a cache."""
from __future__ import annotations

import os
import stat
from pathlib import Path


def enabled() -> bool:
    return os.environ.get("RECONCILER_CACHE", "").lower() not in ("off", "0", "no", "false")


def folder(name: str) -> Path | None:
    """The cache folder `name`, created 0700 if missing; None when caching is off or it is unsafe."""
    if not enabled():
        return None
    base = os.environ.get("RECONCILER_CACHE_DIR")
    if base:
        root = Path(base)
    else:
        xdg = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
        root = Path(xdg) / "reconciler"
    path = root / name
    try:
        path.mkdir(parents=True, exist_ok=True, mode=0o700)
        st = path.stat()
        if st.st_uid != os.geteuid() or st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) or not stat.S_ISDIR(st.st_mode):
            return None
    except OSError:
        return None
    return path
