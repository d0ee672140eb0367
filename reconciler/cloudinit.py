"""cloud-init NoCloud seeds: check user data offline, and build the seed (an ISO 9660 image labelled
`cidata` holding user-data, meta-data and optionally network-config) as bytes, byte-for-byte the same
for the same input. Pure apart from reading nothing at all: secrets arrive already resolved.

Why in-process with pycdlib: an external ISO tool (genisoimage, xorriso, mkisofs) is one more thing to
install on every host and its flags and timestamps differ between versions; a pure-Python writer with
the clock pinned gives the same bytes everywhere, so an unchanged seed is never rebuilt or re-uploaded.
"""
from __future__ import annotations

import hashlib
import io
import re
import time as _time
from typing import Any

LABEL = "cidata"
# The seed's user data is read whole by cloud-init; the secret reader caps a file source at 64 KiB
# and a seed is a CD-ROM image in a pool, not a place for payloads: ship those on a disk.
MAX_USER_DATA = 64 * 1024
# A fixed moment (2000-01-01T00:00:00Z) for every date in the image: no timestamps, same bytes.
SEED_EPOCH = 946684800.0
# `{{secret:NAME}}` in userData is replaced by the value of cloudInit.secrets.NAME when the seed is built.
SECRET_REF = re.compile(r"\{\{\s*secret:([A-Za-z_][A-Za-z0-9_]*)\s*\}\}")

# First lines cloud-init recognises (its "user data formats"); anything else is ignored by it.
_HEADERS = ("#cloud-config", "#!", "#include", "#cloud-boothook", "#part-handler", "#upstart-job",
            "## template: jinja", "Content-Type: multipart/", "#cloud-config-archive")


class _FixedClock:
    """What pycdlib sees as the `time` module: now is always SEED_EPOCH, and local time is UTC, so
    no date in the image depends on when or where it was built. Only pycdlib's modules see this."""

    def time(self) -> float:
        return SEED_EPOCH

    def localtime(self, secs: float | None = None):
        return _time.gmtime(SEED_EPOCH if secs is None else secs)

    def __getattr__(self, name: str) -> Any:
        return getattr(_time, name)


def _pycdlib():
    import pycdlib
    from pycdlib import dates, headervd, pycdlib as core, utils
    clock = _FixedClock()
    for mod in (dates, headervd, core, utils):
        mod.time = clock
    return pycdlib


def check_user_data(text: str, quote: bool = True) -> str | None:
    """Why this user data would not work, or None. Offline: the size, a header cloud-init knows, and for
    #cloud-config a YAML mapping. `cloud-init schema --config-file F` checks modules and keys fully."""
    size = len(text.encode("utf-8"))
    if size > MAX_USER_DATA:
        return f"user data is {size} bytes, more than the {MAX_USER_DATA} a seed takes; put large files on a disk"
    first = text.lstrip("\ufeff").split("\n", 1)[0].rstrip()
    if not first.startswith(_HEADERS):
        # User data from a secret source is never quoted, not even its first line.
        shown = f" (first line: {first[:40]!r})" if quote else ""
        return ("user data must start with '#cloud-config' (a YAML config) or '#!' (a script); "
                f"cloud-init ignores anything else{shown}")
    if first.startswith("#cloud-config") and not first.startswith("#cloud-config-archive"):
        import yaml   # here, not at the top: `reconciler --help` should not pay for it
        try:
            data = yaml.safe_load(text)
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}" if mark is not None else ""
            return f"#cloud-config user data is not valid YAML{where}: {getattr(e, 'problem', None) or 'parse error'}"
        if data is not None and not isinstance(data, dict):
            return f"#cloud-config user data must be a YAML mapping, not a {type(data).__name__}"
    return None


def secret_names(text: str) -> list[str]:
    """The `{{secret:NAME}}` references in a user data template, in order of first use."""
    out: list[str] = []
    for m in SECRET_REF.finditer(text):
        if m.group(1) not in out:
            out.append(m.group(1))
    return out


def render_user_data(template: str, secrets: dict[str, str]) -> str:
    """The user data with each `{{secret:NAME}}` replaced by its value (every name is known: validated)."""
    return SECRET_REF.sub(lambda m: secrets[m.group(1)], template)


def _yaml(data: Any) -> bytes:
    import yaml
    return yaml.safe_dump(data, default_flow_style=False, sort_keys=True, allow_unicode=True).encode("utf-8")


def meta_data(vm_name: str, declared: dict | None) -> dict:
    """The meta-data mapping: as declared, with instance-id defaulting to the VM's name."""
    out = dict(declared or {})
    out.setdefault("instance-id", vm_name)
    return out


def build_seed(user_data: str, meta: dict, network_config: dict | None = None) -> bytes:
    """The NoCloud seed image: ISO 9660 with Joliet and Rock Ridge names (cloud-init and Linux read
    either), volume label cidata, files user-data, meta-data and network-config when given."""
    pycdlib = _pycdlib()
    files = [("user-data", user_data.encode("utf-8")), ("meta-data", _yaml(meta))]
    if network_config is not None:
        files.append(("network-config", _yaml(network_config)))
    iso = pycdlib.PyCdlib()
    iso.new(interchange_level=3, vol_ident=LABEL, sys_ident="LINUX", joliet=3, rock_ridge="1.09")
    for i, (name, data) in enumerate(files):
        iso.add_fp(io.BytesIO(data), len(data), f"/FILE{i};1", rr_name=name, joliet_path=f"/{name}",
                   file_mode=0o100444)
    out = io.BytesIO()
    iso.write_fp(out)
    iso.close()
    return out.getvalue()


def digest(seed: bytes) -> str:
    """How plans and the VM's record name a seed: sha256 of its bytes."""
    return "sha256:" + hashlib.sha256(seed).hexdigest()


class Seed(str):
    """A built seed as it travels in a normalised spec: the string is its digest (what plans, JSON and
    --diff print, and what equality compares), the bytes are in `.image` and never printed."""

    image: bytes

    def __new__(cls, image: bytes) -> "Seed":
        s = super().__new__(cls, digest(image))
        s.image = image
        return s

    def __reduce__(self):
        return (Seed, (self.image,))


# --------------------------------------------------------------------------- the manifest's cloudInit

def _is_source(v: Any) -> bool:
    return isinstance(v, dict) and ("fromFile" in v or "fromEnv" in v)


def resolve_paths(ci: dict, base: str) -> dict:
    """Relative fromFile paths (user data, secrets) mean next to the manifest file."""
    import os

    def fix(src: Any) -> Any:
        if isinstance(src, dict) and isinstance(src.get("fromFile"), str) and not os.path.isabs(src["fromFile"]):
            return {"fromFile": os.path.normpath(os.path.join(base, src["fromFile"]))}
        return src
    out = dict(ci)
    if "userData" in out:
        out["userData"] = fix(out["userData"])
    if isinstance(out.get("secrets"), dict):
        out["secrets"] = {k: fix(v) for k, v in out["secrets"].items()}
    return out


def check(ci: dict, has_disk_pool: bool) -> list[tuple[tuple, str]]:
    """Offline checks of a VM's cloudInit: user data format and size, secret references, a pool to
    keep the seed in. Secret sources that can be read now (variables, absolute files) are read."""
    from .errors import ManifestError
    from .secrets import read_secret
    out: list[tuple[tuple, str]] = []
    at = ("spec", "cloudInit")
    if not ci.get("pool") and not has_disk_pool:
        out.append((at, "the seed needs a pool: give cloudInit.pool, or a first disk that is a declared Disk"))
    secrets = ci.get("secrets") or {}
    ud = ci.get("userData")
    text = None
    if isinstance(ud, str):
        text = ud
    elif _is_source(ud):
        import os
        if "fromEnv" in ud or os.path.isabs(ud.get("fromFile", "")):
            try:
                text = read_secret(ud)
            except ManifestError as e:
                out.append((at + ("userData",), e.message))
    if text is not None:
        used = secret_names(text)
        for name in used:
            if name not in secrets:
                out.append((at + ("userData",), f"{{{{secret:{name}}}}} names no entry of cloudInit.secrets "
                                                f"(declare secrets: {{{name}: {{fromFile: ...}}}})"))
        for name in secrets:
            if name not in used:
                out.append((at + ("secrets", name), f"secret {name} is declared but userData never uses "
                                                    f"{{{{secret:{name}}}}}"))
        problem = check_user_data(text, quote=isinstance(ud, str))
        if problem:
            out.append((at + ("userData",), problem))
    return out


def normalise(ci: dict | None) -> dict | None:
    """{userData, metaData, networkConfig, pool}: secrets read now (validate names a missing one) and
    substituted, the rendered user data held in a Secret so that it never prints. The seed itself is
    built by seed_for, which knows the VM's name (the default instance-id)."""
    if ci is None:
        return None
    from .secrets import Secret, read_secret
    ud = ci.get("userData", "#cloud-config\n")
    text = read_secret(ud) if _is_source(ud) else ud
    values = {k: read_secret(v) for k, v in (ci.get("secrets") or {}).items()}
    return {"userData": Secret(render_user_data(text, values), "cloudInit.userData"),
            "metaData": dict(ci["metaData"]) if ci.get("metaData") else None,
            "networkConfig": ci.get("networkConfig"), "pool": ci.get("pool")}


def instance_id(vm_name: str, ci: dict) -> str:
    return str(meta_data(vm_name, ci.get("metaData"))["instance-id"])


def seed_for(vm_name: str, ci: dict) -> tuple[Seed, str]:
    """The seed of a normalised cloudInit, and its instance-id."""
    meta = meta_data(vm_name, ci.get("metaData"))
    return Seed(build_seed(ci["userData"].reveal(), meta, ci.get("networkConfig"))), str(meta["instance-id"])


def when_read(before_instance: str | None, after_instance: str, running: bool) -> str:
    """What the plan says about when cloud-init will read a new seed."""
    if before_instance is None:
        return "cloud-init reads the seed at the VM's next (first) boot"
    if before_instance != after_instance:
        return (f"new instance-id {after_instance!r}: cloud-init treats the next boot as a first boot and "
                "reads the whole seed")
    return (f"instance-id {after_instance!r} unchanged: cloud-init applies per-boot parts at the next boot "
            "but does not rerun per-instance modules; change metaData.instance-id to have them rerun")
