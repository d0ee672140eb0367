"""Disks from images on qemu:///system (issue 11): a raw and a qcow2 image uploaded through a libvirt
storage stream (sparse: the raw image's holes are not written), the checksum checked before anything is
created (a mismatch is refused in the plan and nothing exists after), a larger capacity grows the
volume after import, a base image with a qcow2 overlay, and `source` creation-time only."""
from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path

from helpers import cli, doc, write

MIB = 1024 * 1024


def _raw_image(path: Path) -> str:
    """8 MiB, sparse: data at 0 and at 6 MiB, holes between."""
    with open(path, "wb") as f:
        f.write(b"HELLO-FROM-THE-IMAGE")
        f.seek(6 * MIB)
        f.write(b"END-OF-DATA")
        f.truncate(8 * MIB)
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_disks_from_images(qemu_uri, prefix, pool_dir, tmp_path):
    p = prefix
    env = {"RECONCILER_LIBVIRT_URI": qemu_uri}
    raw = tmp_path / "img" / "data.raw"
    raw.parent.mkdir()
    raw_sha = _raw_image(raw)
    qcow = tmp_path / "img" / "base.qcow2"
    subprocess.run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", str(raw), str(qcow)], check=True)
    qcow_sha = hashlib.sha256(qcow.read_bytes()).hexdigest()

    def manifests(raw_sha_declared: str, raw_path: Path = raw) -> Path:
        return write(tmp_path / "m" / "disks.yaml",
                     doc("StoragePool", f"{p}pool", {"path": pool_dir}),
                     doc("Disk", f"{p}base", {"pool": f"{p}pool", "format": "qcow2",
                                             "source": {"path": str(qcow), "sha256": qcow_sha}}),
                     doc("Disk", f"{p}data", {"pool": f"{p}pool", "format": "raw", "capacity": "16MiB",
                                             "source": {"path": str(raw_path), "sha256": raw_sha_declared}}),
                     doc("Disk", f"{p}overlay", {"pool": f"{p}pool", "capacity": "32MiB",
                                                "backingStore": {"disk": f"{p}base"}}))

    # A wrong checksum: refused in the plan, and nothing of that disk is created.
    bad = manifests("0" * 64)
    plan = cli("plan", str(bad), env=env)
    assert plan.code == 1 and f"has sha256 {raw_sha}, not the declared" in plan.out, plan.out + plan.err
    r = cli("apply", str(bad), env=env)
    assert r.code == 1
    assert not (Path(pool_dir) / f"{p}data").exists()

    path = manifests(raw_sha)
    plan = cli("plan", str(path), env=env)
    assert plan.code == 2 and "from raw image" in plan.out and "checked" in plan.out, plan.out
    first = cli("apply", str(path), env=env)
    assert first.code == 0, first.out + first.err
    second = cli("apply", str(path), env=env)
    assert second.code == 0 and "changed=0" in second.recap, second.out

    data = Path(pool_dir) / f"{p}data"
    st = data.stat()
    assert st.st_size == 16 * MIB, "capacity larger than the image grows the volume after import"
    with open(data, "rb") as f:
        assert f.read(20) == b"HELLO-FROM-THE-IMAGE"
        f.seek(6 * MIB)
        assert f.read(11) == b"END-OF-DATA"
        f.seek(8 * MIB)
        assert f.read(8 * MIB).count(0) == 8 * MIB
    assert st.st_blocks * 512 < 2 * MIB, f"the upload was not sparse: {st.st_blocks * 512} bytes allocated"

    base = Path(pool_dir) / f"{p}base"
    cmp = subprocess.run(["qemu-img", "compare", "-f", "qcow2", "-F", "qcow2", str(qcow), str(base)],
                         capture_output=True, text=True)
    assert cmp.returncode == 0, cmp.stdout + cmp.stderr
    info = subprocess.run(["qemu-img", "info", "-U", str(Path(pool_dir) / f"{p}overlay")], capture_output=True,
                          text=True).stdout
    assert f"backing file: {base}" in info, info

    # `source` matters at creation only: another image (and checksum) later changes nothing.
    other = tmp_path / "img" / "other.raw"
    other_sha = _raw_image(other)
    later = manifests(other_sha, other)
    plan = cli("plan", str(later), "-o", "json", env=env)
    assert plan.code == 0 and plan.json["changes"] == [], plan.out

    # An image whose format is not the declared one is refused with the fix.
    wrong = write(tmp_path / "m2" / "wrong.yaml",
                  doc("StoragePool", f"{p}pool", {"path": pool_dir}),
                  doc("Disk", f"{p}wrong", {"pool": f"{p}pool", "source": {"path": str(raw)}}))
    plan = cli("plan", str(wrong), env=env)
    assert plan.code == 1 and "is raw but the disk is declared qcow2" in plan.out, plan.out
    assert not (Path(pool_dir) / f"{p}wrong").exists()
    assert os.path.exists(data)
