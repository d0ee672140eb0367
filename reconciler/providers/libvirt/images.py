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
    """cloudInit.pool; the planner filled in the pool of the VM's first declared disk when it is not given."""
    pool = spec["cloudInit"].get("pool")
    if pool:
        return pool
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


# --------------------------------------------------------------------------- a Disk's initial image

QCOW2_MAGIC = b"QFI\xfb"


def image_facts(path: str) -> dict:
    """What the plan needs to know of a local image before anything is created: its format (qcow2 or
    raw, from its header), virtual size, sha256, or why it cannot be read."""
    import hashlib
    try:
        with open(path, "rb") as f:
            head = f.read(32)
            f.seek(0)
            h = hashlib.sha256()
            size = 0
            for block in iter(lambda: f.read(1024 * 1024), b""):
                h.update(block)
                size += len(block)
    except OSError as e:
        return {"error": f"source image {path} cannot be read: {e.strerror}"}
    if head[:4] == QCOW2_MAGIC and len(head) >= 32:
        fmt, virtual = "qcow2", int.from_bytes(head[24:32], "big")
    else:
        fmt, virtual = "raw", size
    return {"format": fmt, "virtual_size": virtual, "size": size, "sha256": h.hexdigest()}


def read_image_facts(sources: dict[str, str], absent: set[str]) -> dict:
    """{path: facts} for the images of the Disks that do not exist yet (only those are ever read)."""
    return {path: image_facts(path) for name, path in sources.items() if name in absent}


def _sparse_upload(conn: libvirt.virConnect, vol: libvirt.virStorageVol, path: str) -> None:
    """Send a local file through a sparse storage stream: holes travel as lengths, not zeros."""
    import errno
    fd = os.open(path, os.O_RDONLY)
    st = conn.newStream(0)
    try:
        vol.upload(st, 0, 0, libvirt.VIR_STORAGE_VOL_UPLOAD_SPARSE_STREAM)

        def read(stream, nbytes, fd):
            return os.read(fd, nbytes)

        def hole(stream, fd):
            cur = os.lseek(fd, 0, os.SEEK_CUR)
            try:
                data = os.lseek(fd, cur, os.SEEK_DATA)
            except OSError as e:
                if e.errno != errno.ENXIO:
                    raise
                data = -1
            if data < 0:                        # in the trailing hole
                in_data, length = False, os.lseek(fd, 0, os.SEEK_END) - cur
            elif data > cur:                    # in a hole before data
                in_data, length = False, data - cur
            else:
                in_data, length = True, os.lseek(fd, cur, os.SEEK_HOLE) - cur
            os.lseek(fd, cur, os.SEEK_SET)
            return [in_data, length]

        def skip(stream, length, fd):
            os.lseek(fd, length, os.SEEK_CUR)
            return 0

        st.sparseSendAll(read, hole, skip, fd)
        st.finish()
    except BaseException:
        try:
            st.abort()
        except libvirt.libvirtError:
            pass
        raise
    finally:
        os.close(fd)


def import_image(p: "LibvirtProvider", pool: libvirt.virStoragePool, name: str, spec: dict) -> libvirt.virStorageVol:
    """A new volume holding the Disk's source image: the checksum checked again before anything is
    created (the file may have changed since the plan), uploaded sparse, then grown to the declared
    capacity when that is larger than the image."""
    src = spec["source"]
    facts = image_facts(src["path"])
    if facts.get("error"):
        raise ApplyError(facts["error"])
    if src.get("sha256") and facts["sha256"] != src["sha256"]:
        raise ApplyError(f"source image {src['path']} has sha256 {facts['sha256']}, not the declared {src['sha256']}; "
                         "nothing was created")
    vol = pool.createXML(domxml.build_volume(name, facts["virtual_size"], facts["format"], None), 0)
    try:
        _sparse_upload(p.conn, vol, src["path"])
        if spec.get("capacity") and spec["capacity"] > facts["virtual_size"]:
            vol.resize(spec["capacity"], 0)
    except BaseException:
        # A half-written volume must not pass for the image at the next run.
        try:
            vol.delete(0)
        except libvirt.libvirtError:
            pass
        raise
    return vol
