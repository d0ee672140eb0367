"""Can the hypervisor's user reach a directory? The host fact behind the refusal of a pool or disk
path QEMU could never open: who QEMU runs as on a local qemu:///system (qemu.conf `user`/`group`,
Debian's default libvirt-qemu), and, for each directory of interest, the first ancestor whose
permission bits and POSIX ACL deny that user search (x) permission. I/O only; the rule that refuses
is the VirtualMachine/Disk/StoragePool kind's (kinds/libvirt.py)."""
from __future__ import annotations

import grp
import os
import pwd
import re
import stat
import struct
from urllib.parse import urlsplit

from ...kinds.libvirt import Blocked, HypervisorAccess

QEMU_CONF = "/etc/libvirt/qemu.conf"
# libvirt's build-time default differs by distribution: Debian's is libvirt-qemu, Fedora's qemu.
DEFAULT_USERS = ("libvirt-qemu", "qemu")

# linux/posix_acl_xattr.h
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_GROUP, _ACL_MASK, _ACL_OTHER = 1, 2, 4, 8, 0x10, 0x20


def is_local_system(uri: str) -> bool:
    """qemu:///system (or qemu+unix:///system) on this machine: the only case where this process sees
    the same file system as QEMU. Remote hosts, session daemons and the test driver are not checked."""
    u = urlsplit(uri)
    return u.scheme in ("qemu", "qemu+unix") and not u.hostname and u.path.rstrip("/") == "/system"


def _conf_value(text: str, key: str) -> str | None:
    m = re.search(rf'^\s*{key}\s*=\s*"([^"]*)"', text, re.M)
    return m.group(1) if m else None


def _resolve_user(value: str) -> tuple[str, int, int] | None:
    """qemu.conf's forms: "name", "+uid", "uid". Returns (name, uid, primary gid)."""
    try:
        if value.startswith("+") or value.isdigit():
            pw = pwd.getpwuid(int(value.lstrip("+")))
        else:
            pw = pwd.getpwnam(value)
    except (KeyError, ValueError):
        if value.startswith("+") and value[1:].isdigit():
            return (value, int(value[1:]), int(value[1:]))
        return None
    return pw.pw_name, pw.pw_uid, pw.pw_gid


def hypervisor_identity(conf_path: str = QEMU_CONF) -> tuple[str, int, frozenset[int]] | None:
    """(user name, uid, gids) QEMU runs as, or None when it cannot be told (then nothing is checked)."""
    try:
        with open(conf_path, encoding="utf-8", errors="replace") as f:
            text = f.read()
    except OSError:
        text = ""
    user = _conf_value(text, "user")
    ident = _resolve_user(user) if user else next(
        (i for i in (_resolve_user(u) for u in DEFAULT_USERS) if i), None)
    if ident is None:
        return None
    name, uid, gid = ident
    group = _conf_value(text, "group")
    if group:
        try:
            gid = int(group.lstrip("+")) if group.lstrip("+").isdigit() else grp.getgrnam(group).gr_gid
        except KeyError:
            pass
    gids = {gid}
    try:
        # libvirt starts QEMU with the user's supplementary groups too.
        gids.update(os.getgrouplist(name, gid))
    except (KeyError, OSError):
        pass
    return name, uid, frozenset(gids)


def _acl(path: str) -> list[tuple[int, int, int]] | None:
    """The POSIX access ACL of a path as (tag, perm, id) entries, or None when it has none."""
    try:
        raw = os.getxattr(path, "system.posix_acl_access")
    except OSError:
        return None
    if len(raw) < 4:
        return None
    return [struct.unpack_from("<HHI", raw, off) for off in range(4, len(raw) - 7, 8)]


def can_search(st: os.stat_result, acl: list | None, uid: int, gids: frozenset[int]) -> bool:
    """The kernel's permission check for search (x) on a directory, for uid with gids."""
    if uid == 0:
        return True
    if st.st_uid == uid:
        return bool(st.st_mode & stat.S_IXUSR)
    if acl:
        mask = next((p for t, p, _ in acl if t == _ACL_MASK), 7)
        for t, p, i in acl:
            if t == _ACL_USER and i == uid:
                return bool(p & mask & 1)
        matched = [p for t, p, i in acl if (t == _ACL_GROUP_OBJ and st.st_gid in gids) or (t == _ACL_GROUP and i in gids)]
        if matched:
            return any(p & mask & 1 for p in matched)
        return any(p & 1 for t, p, _ in acl if t == _ACL_OTHER)
    if st.st_gid in gids:
        return bool(st.st_mode & stat.S_IXGRP)
    return bool(st.st_mode & stat.S_IXOTH)


def first_blocked(path: str, uid: int, gids: frozenset[int]) -> Blocked | None:
    """The first existing directory from / down to `path` that uid cannot search; None if all can be.
    Directories that do not exist yet are libvirt's to create (a pool's build makes them searchable)."""
    real = os.path.realpath(path)
    parts = [p for p in real.split("/") if p]
    current = "/"
    for i in range(len(parts) + 1):
        if i:
            current = os.path.join(current, parts[i - 1])
        try:
            st = os.stat(current)
        except OSError:
            return None
        if not stat.S_ISDIR(st.st_mode):
            return None
        if not can_search(st, _acl(current), uid, gids):
            try:
                owner = pwd.getpwuid(st.st_uid).pw_name
            except KeyError:
                owner = str(st.st_uid)
            return Blocked(current, stat.S_IMODE(st.st_mode), owner)
    return None


def read_access(uri: str, dirs: set[str]) -> HypervisorAccess | None:
    """The host fact for the planner: who QEMU runs as and which of `dirs` it cannot reach."""
    if not is_local_system(uri):
        return None
    ident = hypervisor_identity()
    if ident is None:
        return None
    name, uid, gids = ident
    blocked = {}
    for d in sorted(dirs):
        b = first_blocked(d, uid, gids)
        if b is not None:
            blocked[os.path.normpath(d)] = b
    return HypervisorAccess(name, blocked)
