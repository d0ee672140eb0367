"""What `reconciler status` costs at fleet scale, against the time of one getAllDomainStats call.

On libvirtd's test hypervisor (test+unix:///default, held open: its state lives only while a
connection is), the fleet bench/bench.py defines (N VMs running with a disk each, N disks in its
default-pool; no MQTT: the broker's $SYS read is one subscription, independent of N) is created with
`reconciler apply`, then, alternating, REPS times each (median, whole processes, wall time):

  floor   one getAllDomainStats(NOWAIT) call in a process that already holds a connection (in-process
          time of the call alone), and the same call as a whole `python -c` process
  status  `reconciler status -o json --sample 0` (no PATHs: the host's objects, managed or not)
  plan    `reconciler status PATH -o json --sample 0` (with the manifests: the same read and plan as `plan`)
  sample  `reconciler status PATH -o json` (the default 1 s between the two CPU samples)
  plan    `reconciler plan PATH -o json`, for reference: the same load, read and plan, without statistics

    .venv/bin/python bench/status_cost.py [--n 1000] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "bench"))
sys.path.insert(0, str(ROOT / "scripts"))

URI = "test+unix:///default"
PY = sys.executable
CALL = ("import libvirt,time;c=libvirt.open('test+unix:///default');"
        "c.getAllDomainStats(0,libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)")


def wall(cmd: list[str], env: dict) -> float:
    started = time.monotonic()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=ROOT)
    took = time.monotonic() - started
    if p.returncode != 0:
        raise SystemExit(f"{' '.join(cmd[:4])}... failed ({p.returncode}): {p.stderr[-2000:]}")
    return took


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--n", type=int, default=1000)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args(argv)
    import libvirt
    from bench import write_fleet
    libvirt.registerErrorHandler(lambda *a: None, None)
    conn = libvirt.open(URI)
    prefix = f"st{uuid.uuid4().hex[:6]}-"
    env = {**os.environ, "RECONCILER_LIBVIRT_URI": URI, "RECONCILER_SCOPE": prefix.rstrip("-")}
    for k in ("RECONCILER_MQTT_USERNAME", "RECONCILER_MQTT_PASSWORD", "RECONCILER_MQTT_PASSWORD_FILE"):
        env.pop(k, None)
    tmp = Path(tempfile.mkdtemp(prefix="reconciler-status-bench-"))
    try:
        mdir = tmp / "fleet"
        write_fleet(mdir, prefix, args.n, mqtt=False)
        print(f"creating {args.n} VMs + {args.n} disks on {URI} ...", flush=True)
        wall([PY, "-m", "reconciler", "apply", "--quiet", str(mdir)], env)
        doms = conn.listAllDomains(0)
        print(f"domains on the host: {len(doms)} ({sum(1 for d in doms if d.name().startswith(prefix))} ours)")
        calls, procs, bare, planned, sampled, plans = [], [], [], [], [], []
        for _ in range(args.reps):
            t = time.monotonic()
            stats = conn.getAllDomainStats(0, libvirt.VIR_CONNECT_GET_ALL_DOMAINS_STATS_NOWAIT)
            calls.append(time.monotonic() - t)
            procs.append(wall([PY, "-c", CALL], env))
            bare.append(wall([PY, "-m", "reconciler", "status", "-o", "json", "--sample", "0"], env))
            planned.append(wall([PY, "-m", "reconciler", "status", str(mdir), "-o", "json", "--sample", "0"], env))
            sampled.append(wall([PY, "-m", "reconciler", "status", str(mdir), "-o", "json"], env))
            plans.append(wall([PY, "-m", "reconciler", "plan", str(mdir), "-o", "json"], env))
        assert len(stats) >= args.n
        p = subprocess.run([PY, "-m", "reconciler", "status", str(mdir), "-o", "json", "--sample", "0", "--verbose"],
                           env=env, capture_output=True, text=True, cwd=ROOT)
        rep = json.loads(p.stdout)
        assert sum(rep["drift"].values()) == 0, rep["drift"]
        med = statistics.median
        res = {"n": args.n, "domains": len(stats), "call_s": med(calls), "call_process_s": med(procs),
               "status_s": med(bare), "status_paths_s": med(planned), "status_paths_sampled_s": med(sampled), "plan_s": med(plans),
               "phases": p.stderr.strip()}
        print(f"one getAllDomainStats call (in-process, {len(stats)} domains): {1000 * res['call_s']:.1f} ms")
        print(f"the same call as a whole python process:       {res['call_process_s']:.3f} s")
        print(f"reconciler status --sample 0 (no PATHs):        {res['status_s']:.3f} s")
        print(f"reconciler status PATH --sample 0 (with plan):   {res['status_paths_s']:.3f} s")
        print(f"reconciler status PATH (1 s CPU sample):         {res['status_paths_sampled_s']:.3f} s")
        print(f"reconciler plan PATH (reference):               {res['plan_s']:.3f} s")
        print(f"phases of one status PATH run: {res['phases']}")
        print(json.dumps(res))
        return 0
    finally:
        print("removing the fleet ...", flush=True)
        for dom in conn.listAllDomains(0):
            if dom.name().startswith(prefix):
                try:
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
                except libvirt.libvirtError:
                    pass
        for pool in conn.listAllStoragePools(0):
            if pool.isActive():
                for vol in pool.listAllVolumes(0):
                    if vol.name().startswith(prefix):
                        try:
                            vol.delete(0)
                        except libvirt.libvirtError:
                            pass
        conn.close()
        import shutil
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
