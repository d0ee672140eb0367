"""cloudInit seeds (issue 11): the NoCloud ISO judged by isoinfo and xorriso (label cidata, the files,
their bytes), byte-for-byte the same across processes, time zones and time; offline checks of user data
in `validate`; and on qemu:///system a seed volume written, rewritten in place on change, never shown,
and deleted with its VM (the running VM's live media swap and the guest reading it: test_guest_e2e.py)."""
from __future__ import annotations

import hashlib
import os
import subprocess
import sys
from pathlib import Path

import pytest

from helpers import ROOT, cli, doc, write
from reconciler import cloudinit


def _seed(tmp_path: Path, name: str = "seed.iso", **kw) -> Path:
    data = cloudinit.build_seed(kw.get("user", "#cloud-config\nhostname: gw-1\n"),
                                cloudinit.meta_data("gw-1", kw.get("meta")), kw.get("net"))
    p = tmp_path / name
    p.write_bytes(data)
    return p


def _run(*args: str) -> str:
    p = subprocess.run(args, capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, p.stderr
    return p.stdout


def test_seed_is_a_cidata_iso_with_the_nocloud_files(tmp_path):
    iso = _seed(tmp_path, net={"version": 2, "ethernets": {"eth0": {"dhcp4": True}}})
    info = _run("isoinfo", "-d", "-i", str(iso))
    assert "Volume id: cidata" in info
    assert "Rock Ridge signatures version 1 found" in info
    assert "Joliet with UCS level 3 found" in info
    for ext in ("-R", "-J"):
        names = set(_run("isoinfo", "-f", ext, "-i", str(iso)).split())
        assert names == {"/user-data", "/meta-data", "/network-config"}, (ext, names)
    assert _run("isoinfo", "-R", "-x", "/user-data", "-i", str(iso)) == "#cloud-config\nhostname: gw-1\n"
    assert _run("isoinfo", "-R", "-x", "/meta-data", "-i", str(iso)) == "instance-id: gw-1\n"
    assert "dhcp4: true" in _run("isoinfo", "-R", "-x", "/network-config", "-i", str(iso))
    # A second, independent reader agrees.
    out = subprocess.run(["xorriso", "-indev", str(iso), "-pvd_info", "-ls", "/"], capture_output=True, text=True,
                         timeout=60)
    assert out.returncode == 0, out.stderr
    assert "Volume Id    : cidata" in out.stdout + out.stderr
    for f in ("'user-data'", "'meta-data'", "'network-config'"):
        assert f in out.stdout


def test_seed_bytes_are_the_same_across_processes_clocks_and_time_zones(tmp_path):
    code = ("import hashlib,sys; from reconciler import cloudinit as c; "
            "sys.stdout.write(hashlib.sha256(c.build_seed('#!/bin/sh\\necho hi\\n', c.meta_data('gw', None), "
            "{'version': 2})).hexdigest())")
    digests = set()
    for tz in ("UTC", "America/New_York", "Asia/Kolkata"):
        p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                           env={**os.environ, "TZ": tz}, timeout=60)
        assert p.returncode == 0, p.stderr
        digests.add(p.stdout)
    digests.add(hashlib.sha256(cloudinit.build_seed("#!/bin/sh\necho hi\n", cloudinit.meta_data("gw", None),
                                                    {"version": 2})).hexdigest())
    assert len(digests) == 1, digests
    a = _seed(tmp_path, "a.iso")
    b = _seed(tmp_path, "b.iso")
    assert a.read_bytes() == b.read_bytes()
    c = _seed(tmp_path, "c.iso", meta={"instance-id": "gw-1-v2"})
    assert c.read_bytes() != a.read_bytes()


def _vm(name: str, ci: dict, pool: str = "p") -> dict:
    return doc("VirtualMachine", name, {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": "shutoff",
                                        "cloudInit": {"pool": pool, **ci}})


@pytest.mark.parametrize("ci, says", [
    ({"userData": "#cloud-config\nusers: [a\n"}, "not valid YAML"),
    ({"userData": "#cloud-config\n- a\n"}, "must be a YAML mapping"),
    ({"userData": "hostname: gw-1\n"}, "must start with '#cloud-config'"),
    ({"userData": "#!/bin/sh\n" + "x" * (65 * 1024)}, "65536"),
    ({"userData": "#!/bin/sh\necho {{secret:PW}}\n"}, "names no entry of cloudInit.secrets"),
    ({"userData": "#!/bin/sh\n", "secrets": {"PW": {"fromEnv": "HOME"}}}, "never uses {{secret:PW}}"),
    ({"userData": {"fromEnv": "CI_TEST_UNSET_VAR"}}, "environment variable CI_TEST_UNSET_VAR is not set"),
    ({"userData": "#!/bin/sh\n", "pool": None}, "the seed needs a pool"),
])
def test_validate_checks_user_data_offline(tmp_path, ci, says):
    if ci.get("pool", "x") is None:
        ci = {k: v for k, v in ci.items() if k != "pool"}
        d = doc("VirtualMachine", "gw", {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "cloudInit": ci})
    else:
        d = _vm("gw", ci)
    path = write(tmp_path / "vm.yaml", d)
    r = cli("validate", str(path))
    assert r.code == 1, r.out + r.err
    assert says in r.err, r.err
    assert "vm.yaml:" in r.err and "VirtualMachine" in r.err and "Traceback" not in r.err


def test_user_data_from_a_secret_source_is_never_quoted(tmp_path):
    secret_ud = tmp_path / "ud"
    secret_ud.write_text("s3cr3t-first-line\n")
    path = write(tmp_path / "vm.yaml", _vm("gw", {"userData": {"fromFile": str(secret_ud)}}))
    r = cli("validate", str(path))
    assert r.code == 1 and "must start with '#cloud-config'" in r.err, r.err
    assert "s3cr3t" not in r.out + r.err


def test_seed_volume_on_a_real_host(qemu_uri, prefix, pool_dir, tmp_path):
    pw = tmp_path / "pw"
    pw.write_text("p4ss-" + prefix + "\n")
    pool = f"{prefix}pool"

    def manifests(hostname: str, instance: str | None = None) -> Path:
        ci = {"userData": f"#cloud-config\nhostname: {hostname}\npassword: '{{{{secret:PW}}}}'\n",
              "secrets": {"PW": {"fromFile": str(pw)}}}
        if instance:
            ci["metaData"] = {"instance-id": instance}
        return write(tmp_path / "m" / "vm.yaml", doc("StoragePool", pool, {"path": pool_dir}),
                     _vm(f"{prefix}vm", ci, pool))

    # A scope of its own: no other test's --prune in the shared "tests" scope can take its VM.
    env = {"RECONCILER_LIBVIRT_URI": qemu_uri, "RECONCILER_SCOPE": prefix.rstrip("-")}
    path = manifests("gw-1")
    outputs = []

    def run(*a):
        r = cli(*a, env=env)
        outputs.append(r.out + r.err)
        return r

    first = run("apply", str(path))
    assert first.code == 0, first.out + first.err
    second = run("apply", str(path))
    assert second.code == 0 and "changed=0" in second.recap, second.out
    seed = Path(pool_dir) / f"{prefix}vm-cidata"
    want = cloudinit.seed_for(f"{prefix}vm", _normalised(path, f"{prefix}vm"))[0]
    assert seed.read_bytes() == want.image
    # The seed is the VM's: not listed as a Disk, not an orphan in the declared pool.
    plan = run("plan", str(path), "-o", "json")
    assert plan.code == 0 and plan.json["changes"] == [], plan.out
    assert "cidata" not in run("plan", str(path)).out

    # A changed seed: digests in the plan, the note about when cloud-init reads it, rewritten in place.
    inode = seed.stat().st_ino
    path = manifests("gw-2")
    plan = run("plan", str(path), "--diff")
    assert plan.code == 2
    assert f"spec.cloudInit: {want} -> sha256:" in plan.out, plan.out
    assert "does not rerun per-instance modules" in plan.out
    r = run("apply", str(path))
    assert r.code == 0, r.out + r.err
    assert seed.stat().st_ino == inode, "the seed volume must be rewritten in place, not recreated"
    assert b"hostname: gw-2" in seed.read_bytes()
    assert "changed=0" in run("apply", str(path)).recap

    path = manifests("gw-2", instance="gw-2-rebuilt")
    plan = run("plan", str(path))
    assert "new instance-id 'gw-2-rebuilt'" in plan.out, plan.out
    assert run("apply", str(path)).code == 0
    assert "changed=0" in run("apply", str(path)).recap

    for out in outputs:
        assert "p4ss-" not in out, "the seed's secret appeared in output"

    gone = write(path, doc("StoragePool", pool, {"path": pool_dir}),
                 doc("VirtualMachine", f"{prefix}vm", {"memory": "64MiB", "vcpus": 1, "state": "absent"}))
    r = run("apply", str(gone))
    assert r.code == 0 and "seed" in r.out, r.out
    assert not seed.exists()
    assert "changed=0" in run("apply", str(gone)).recap


def _normalised(path: Path, name: str) -> dict:
    from reconciler.kinds.registry import BY_NAME
    import yaml
    for d in yaml.safe_load_all(path.read_text()):
        if d["kind"] == "VirtualMachine" and d["metadata"]["name"] == name:
            return BY_NAME["VirtualMachine"].normalise(d["spec"])["cloudInit"]
    raise AssertionError(name)
