"""Content into libvirt storage volumes through storage streams, so it works on a remote qemu+ssh://
host as on this one: a VM's cloud-init seed (written in place, swapped live on a running VM) and a
Disk's initial image (sparse where the image is). Called by the provider's handlers; decides nothing."""
from __future__ import annotations

import os
from typing import TYPE_CHECKING

import libvirt

from ... import cloudinit
from ...errors import ApplyError
from . import bootxml, domxml

if TYPE_CHECKING:
    from .provider import LibvirtProvider

CHUNK = 256 * 1024
LIVE_CONFIG = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_AFFECT_CONFIG


# --------------------------------------------------------------------------- streams

def upload_bytes(conn: libvirt.virConnect, vol: libvirt.virStorageVol, data: bytes) -> None:
    """Write `data` at the start of the volume through a storage stream."""
    st = conn.newStream(0)
    try:
        vol.upload(st, 0, len(data), 0)
        view = memoryview(data)
        off = 0
        while off < len(data):
            n = st.send(bytes(view[off:off + CHUNK]))
            if n < 0:
                raise ApplyError("the storage stream refused data")
            off += n
        st.finish()
    except BaseException:
        try:
            st.abort()
        except libvirt.libvirtError:
            pass
        raise


# --------------------------------------------------------------------------- cloud-init seed

def seed_pool(p: "LibvirtProvider", spec: dict) -> str:
    """cloudInit.pool, else the pool of the VM's first disk that is a declared Disk."""
    ci = spec["cloudInit"]
    if ci.get("pool"):
        return ci["pool"]
    for d in spec.get("disks", []):
        if "disk" in d:
            v = p.volumes.get(d["disk"])
            if v is not None:
                return v["pool"]
            break
    raise ApplyError("cloudInit needs a pool for its seed: give cloudInit.pool")


def seed_info(p: "LibvirtProvider", vm: str, spec: dict, live_ci: dict | None) -> tuple[dict, bytes]:
    """Where the seed goes and what it holds: ({seed, instanceId, pool, volume, target, path}, image)."""
    seed, inst = cloudinit.seed_for(vm, spec["cloudInit"])
    pool_name = seed_pool(p, spec)
    pool = p._pool_of(pool_name)
    name = bootxml.seed_volume_name(vm)
    path = os.path.join(domxml.parse_pool(pool.XMLDesc(0))["path"] or "", name)
    target = bootxml.seed_target(spec.get("disks", []), (live_ci or {}).get("target"))
    return ({"seed": str(seed), "instanceId": inst, "pool": pool_name, "volume": name, "target": target,
             "path": path}, seed.image)


def write_seed(p: "LibvirtProvider", info: dict, image: bytes) -> None:
    """The seed volume holds `image`, exactly: created when missing, resized to the image's size and
    rewritten in place (same file, same inode: a running QEMU that reopens it reads the new bytes)."""
    pool = p._pool_of(info["pool"])
    try:
        vol = pool.storageVolLookupByName(info["volume"])
    except libvirt.libvirtError as e:
        if e.get_error_code() != libvirt.VIR_ERR_NO_STORAGE_VOL:
            raise
        vol = pool.createXML(domxml.build_volume(info["volume"], len(image), "raw", None), 0)
    capacity = vol.info()[1]
    if capacity != len(image):
        vol.resize(len(image), libvirt.VIR_STORAGE_VOL_RESIZE_SHRINK if len(image) < capacity else 0)
    upload_bytes(p.conn, vol, image)
    info["path"] = vol.path()


def swap_media(dom: libvirt.virDomain, info: dict) -> None:
    """A running VM's seed CD-ROM gets the rewritten seed: eject, then insert (a media change with an
    unchanged path alone can leave QEMU on its old view of the file). Forced: the guest may hold the
    tray locked while the seed is mounted."""
    flags = libvirt.VIR_DOMAIN_AFFECT_LIVE | libvirt.VIR_DOMAIN_DEVICE_MODIFY_FORCE
    import xml.etree.ElementTree as ET
    dom.updateDeviceFlags(ET.tostring(bootxml.seed_disk_element(info, with_source=False), encoding="unicode"), flags)
    dom.updateDeviceFlags(ET.tostring(bootxml.seed_disk_element(info), encoding="unicode"), flags)


def sync_seed(p: "LibvirtProvider", dom: libvirt.virDomain, info: dict, image: bytes, live_ci: dict | None,
              active: bool) -> str:
    """Apply a changed seed to an existing VM: rewrite the volume; when the VM already has its seed
    CD-ROM, swap the media live and update the marker (live and persistent). A VM getting its first
    seed gets the CD-ROM through its definition (restart-class), which the caller rewrites."""
    write_seed(p, info, image)
    if not live_ci:
        return "seed written; its CD-ROM is added to the definition"
    if active and domxml.find_disk_xml(dom.XMLDesc(0), info["target"]) is not None:
        swap_media(dom, info)
        flags, how = LIVE_CONFIG, "new media inserted live"
    else:
        flags, how = libvirt.VIR_DOMAIN_AFFECT_CONFIG, "the VM reads it when it starts"
    dom.setMetadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, bootxml.seed_xml(info), bootxml.NS_CI_PREFIX,
                    bootxml.NS_CI, flags)
    return f"seed rewritten in place ({how})"


def delete_seed(conn: libvirt.virConnect, live_ci: dict | None) -> str | None:
    """Remove a deleted VM's seed volume; a seed already gone is fine."""
    if not live_ci or not live_ci.get("path"):
        return None
    try:
        conn.storageVolLookupByPath(live_ci["path"]).delete(0)
    except libvirt.libvirtError as e:
        if e.get_error_code() in (libvirt.VIR_ERR_NO_STORAGE_VOL, libvirt.VIR_ERR_NO_STORAGE_POOL):
            return None
        raise
    return f"seed {live_ci['path']} deleted"
