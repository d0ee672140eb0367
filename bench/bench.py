"""`make bench`: reconciler at fleet scale, side by side with the API floor and with Ansible, in one run.

What it does, in order (every timed thing is a whole process, started and reaped the same way:
wall time from spawn to exit, peak RSS from that child's own rusage via wait4):

  1. holds one connection to libvirtd's test hypervisor open (its state lives only while one is),
     and starts a private Mosquitto broker with dynamic security on a free loopback port;
  2. apply: `reconciler apply` creating APPLY_N VMs vs the floor's define-and-start loop of the same
     domain XML (bench/floor.py define), alternating, median of the repetitions;
  3. scale: for each N in SIZES (ascending), manifests for N VMs + N disks + N Topics + N/5 MQTT
     clients + N/5 roles + N/100 groups; `reconciler apply` creates what is missing, then the no-op
     `reconciler plan` and the floor's bare reads (bench/floor.py read) alternate REPS times;
  4. startup: `reconciler --help` and `validate` of the largest manifests vs a bare `python -c pass`;
  5. peer: ansible-core with community.libvirt's `virt` module defining and starting PEER_N VMs and a
     no-op rerun, next to `reconciler apply` of the same VMs and its rerun (skipped, saying why, when
     Ansible cannot be installed into .run/bench-venv);
  6. prints every figure, checks the targets, writes them as JSON (--json), and removes everything it
     created (its domains and volumes, its broker, its temp dir), also when interrupted.

    .venv/bin/python bench/bench.py [--sizes 100,300,1000] [--reps 5] [--apply-n 500] [--peer-n 100]
                                    [--no-peers] [--no-mqtt] [--json .run/bench-results.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "scripts"))   # devbroker: the demo/test broker launcher

PY = sys.executable
FLOOR = str(ROOT / "bench" / "floor.py")
URI = "test+unix:///default"
POOL = "default-pool"           # the test hypervisor's own pool
CLIENT_PASSWORD_ENV = "BENCH_CLIENT_PASSWORD"
PEER_VENV = ROOT / ".run" / "bench-venv"
PEER_PACKAGES = ("ansible", "libvirt-python", "lxml")   # `ansible` bundles community.libvirt

TARGET_PLAN_RATIO = 2.0          # median of the runs' ratios
TARGET_PLAN_WORST = 2.5          # the worst run's ratio
TARGET_GROWTH = 2.0              # plan's cost per extra VM within this multiple of the floor's
TARGET_APPLY_RATIO = 1.5
TARGET_RSS_MIB = 200
TARGET_REACTION_S = 2.0          # drift by hand corrected by `watch --interval 10m`
TARGET_IDLE_CORE = 0.01          # an idle watch: under 1% of one core


def say(text: str = "") -> None:
    print(text, flush=True)


# --------------------------------------------------------------------------- timing

@dataclass
class Run:
    seconds: float
    rss_mib: float
    code: int
    out: str = ""
    err: str = ""


def timed(cmd: list[str], env: dict | None = None, ok=(0,), what: str = "") -> Run:
    """Run one whole process; its wall time and its own peak RSS (wait4 rusage of that child only)."""
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        t0 = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, env=env, cwd=str(ROOT))
        _, status, usage = os.wait4(p.pid, 0)
        seconds = time.perf_counter() - t0
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        r = Run(seconds, usage.ru_maxrss / 1024, p.returncode,
                out.read().decode(errors="replace"), err.read().decode(errors="replace"))
    if ok is not None and r.code not in ok:
        tail = "\n".join((r.out + r.err).strip().splitlines()[-15:])
        raise BenchError(f"{what or cmd[:4]} exited {r.code}, expected {ok}:\n{tail}")
    return r


class BenchError(Exception):
    pass


def median(runs: list[Run]) -> float:
    return statistics.median(r.seconds for r in runs)


# --------------------------------------------------------------------------- manifests

def _doc(kind: str, name: str, spec: dict, labels: dict | None = None) -> dict:
    meta: dict = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "reconciler/v1", "kind": kind, "metadata": meta, "spec": spec}


def _dump(path: Path, docs: list[dict]) -> None:
    import yaml
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False, width=200))


def vm_spec(disk: str | None) -> dict:
    spec = {"hypervisor": "test", "memory": "64MiB", "vcpus": 1, "state": "running", "graphics": "none",
            "description": "bench edge VM"}
    if disk:
        spec["disks"] = [{"disk": disk, "target": "vda", "bus": "virtio"}]
    return spec


def fleet_counts(n: int, mqtt: bool) -> dict:
    c = {"vms": n, "disks": n}
    if mqtt:
        c.update(topics=n, clients=max(1, n // 5), roles=max(1, n // 5), groups=max(1, n // 100))
    return c


def write_fleet(d: Path, prefix: str, n: int, mqtt: bool) -> dict:
    """Manifests for a fleet of n VMs, a file per 100 VMs (a repository's layout, not one huge file)."""
    if d.exists():
        shutil.rmtree(d)
    counts = fleet_counts(n, mqtt)
    for start in range(0, n, 100):
        docs = []
        for i in range(start, min(n, start + 100)):
            docs.append(_doc("Disk", f"{prefix}d{i:05d}", {"pool": POOL, "capacity": "1MiB", "format": "raw"}))
            docs.append(_doc("VirtualMachine", f"{prefix}vm{i:05d}", vm_spec(f"{prefix}d{i:05d}"),
                             {"site": f"plant-{i % 7}", "bench": "fleet"}))
        _dump(d / "libvirt" / f"vms-{start:05d}.yaml", docs)
    if mqtt:
        roles, clients, groups = counts["roles"], counts["clients"], counts["groups"]
        docs = [_doc("MqttRole", f"{prefix}role{i:04d}", {
            "description": "bench role",
            "acls": [{"type": "subscribePattern", "topic": f"bench/{prefix}r{i}/#", "allow": True}]})
            for i in range(roles)]
        docs += [_doc("MqttGroup", f"{prefix}group{i:03d}", {"roles": [{"name": f"{prefix}role{i:04d}", "priority": 1}]})
                 for i in range(groups)]
        docs += [_doc("MqttClient", f"{prefix}client{i:04d}", {
            "password": {"fromEnv": CLIENT_PASSWORD_ENV},
            "roles": [{"name": f"{prefix}role{i % roles:04d}"}],
            "groups": [{"name": f"{prefix}group{i % groups:03d}"}]}) for i in range(clients)]
        _dump(d / "mqtt" / "access.yaml", docs)
        for start in range(0, n, 250):
            tdocs = [_doc("Topic", f"bench/{prefix}site{i % 50}/gw{i:05d}/config", {
                "retained": {"json": {"interval": 30, "gw": i}, "qos": 1},
                "publishers": [f"{prefix}role{i % roles:04d}"]}) for i in range(start, min(n, start + 250))]
            _dump(d / "mqtt" / f"topics-{start:05d}.yaml", tdocs)
    return counts


def write_vms_only(d: Path, prefix: str, n: int) -> None:
    if d.exists():
        shutil.rmtree(d)
    docs = [_doc("VirtualMachine", f"{prefix}{i:05d}", vm_spec(None), {"bench": "apply"}) for i in range(n)]
    _dump(d / "vms.yaml", docs)


def domain_xmls(manifest_dir: Path) -> list[tuple[str, str]]:
    """The exact domain XML reconciler defines for each VM of manifest_dir (VMs without disks)."""
    from reconciler import manifests as manifest
    from reconciler.providers.libvirt import domxml
    return [(r.id.name, domxml.build_domain(r.id.name, dict(r.spec), dict(r.labels), {}))
            for r in manifest.load([str(manifest_dir)]) if r.id.kind == "VirtualMachine"]


# --------------------------------------------------------------------------- the bench

@dataclass
class Bench:
    args: argparse.Namespace
    tmp: Path
    prefix: str
    conn: object = None
    broker: object = None
    results: dict = field(default_factory=dict)

    # ---------------------------------------------------------------- environment

    def env(self) -> dict:
        e = dict(os.environ)
        e[CLIENT_PASSWORD_ENV] = "bench-client-secret"
        e["RECONCILER_LIBVIRT_URI"] = URI
        e.pop("RECONCILER_MQTT_PASSWORD_FILE", None)
        if self.broker is not None:
            e["RECONCILER_MQTT_URL"] = self.broker.url
            e["RECONCILER_MQTT_USERNAME"] = "admin"
            e["RECONCILER_MQTT_PASSWORD"] = self.broker.password
        return e

    def reconciler(self, *args: str) -> list[str]:
        return [PY, "-m", "reconciler", *args]

    def floor_read(self) -> list[str]:
        cmd = [PY, FLOOR, "read", "--libvirt-uri", URI]
        if self.broker is not None:
            cmd += ["--mqtt-url", self.broker.url, "--mqtt-username", "admin"]
        return cmd

    def open(self) -> None:
        import libvirt
        libvirt.registerErrorHandler(lambda *a: None, None)
        try:
            self.conn = libvirt.open(URI)
        except libvirt.libvirtError as e:
            raise BenchError(f"cannot open {URI} (is libvirtd running? `bash scripts/setup.sh`): {e}") from None
        if not self.args.no_mqtt:
            import devbroker
            last = None
            for _ in range(5):
                try:
                    self.broker = devbroker.start(self.tmp / "broker", devbroker.free_port())
                    break
                except devbroker.DevBrokerError as e:
                    last = e
                    devbroker.stop(self.tmp / "broker")
            if self.broker is None:
                raise BenchError(f"cannot start a local Mosquitto broker: {last}")

    def host_counts(self) -> dict:
        doms = self.conn.listAllDomains(0)
        vols = sum(len(p.listAllVolumes(0)) for p in self.conn.listAllStoragePools(0) if p.isActive())
        return {"domains": len(doms), "volumes": vols,
                "foreign_domains": sum(1 for d in doms if not d.name().startswith(self.prefix))}

    def remove_domains(self, prefix: str) -> int:
        import libvirt
        n = 0
        for dom in self.conn.listAllDomains(0):
            if dom.name().startswith(prefix):
                try:
                    if dom.isActive():
                        dom.destroy()
                    dom.undefine()
                    n += 1
                except libvirt.libvirtError:
                    pass
        return n

    def cleanup(self) -> None:
        import libvirt
        if self.conn is not None:
            try:
                self.remove_domains(self.prefix)
                for pool in self.conn.listAllStoragePools(0):
                    if pool.isActive():
                        for vol in pool.listAllVolumes(0):
                            if vol.name().startswith(self.prefix):
                                try:
                                    vol.delete(0)
                                except libvirt.libvirtError:
                                    pass
            finally:
                self.conn.close()
                self.conn = None
        if self.broker is not None:
            self.broker.stop()
            self.broker = None

    # ---------------------------------------------------------------- parts

    def apply_vs_floor(self) -> None:
        n, reps = self.args.apply_n, self.args.apply_reps
        p = f"{self.prefix}a-"
        mdir = self.tmp / "apply"
        write_vms_only(mdir, p, n)
        xdir = self.tmp / "apply-xml"
        xdir.mkdir()
        for name, xml in domain_xmls(mdir):
            (xdir / f"{name}.xml").write_text(xml)
        env = self.env()
        rec, flo = [], []
        for i in range(reps):
            order = ("rec", "floor") if i % 2 == 0 else ("floor", "rec")
            for who in order:
                if who == "rec":
                    rec.append(timed(self.reconciler("apply", str(mdir)), env, what="reconciler apply"))
                else:
                    flo.append(timed([PY, FLOOR, "define", str(xdir), "--libvirt-uri", URI], env, what="floor define"))
                if self.remove_domains(p) != n:
                    raise BenchError(f"apply of {n} VMs did not leave {n} domains")
        self.results["apply"] = {"vms": n, "reps": reps, "reconciler_s": median(rec), "floor_s": median(flo),
                                 "ratio": median(rec) / median(flo),
                                 "reconciler_rss_mib": max(r.rss_mib for r in rec)}

    def scale(self) -> None:
        env = self.env()
        mdir = self.tmp / "fleet"
        mqtt = self.broker is not None
        self.results["scale"] = []
        for n in self.args.sizes:
            counts = write_fleet(mdir, self.prefix, n, mqtt)
            create = timed(self.reconciler("apply", "--quiet", str(mdir)), env, what=f"setup apply at N={n}")
            check = timed(self.reconciler("plan", str(mdir)), env, ok=(0, 2), what=f"plan at N={n}")
            if check.code != 0:
                changed = [l for l in check.out.splitlines() if l.startswith(("changed", "failed"))][:5]
                raise BenchError(f"the plan after apply at N={n} is not a no-op:\n" + "\n".join(changed))
            host = self.host_counts()
            rec, flo = [], []
            for i in range(self.args.reps):
                order = ("rec", "floor") if i % 2 == 0 else ("floor", "rec")
                for who in order:
                    if who == "rec":
                        rec.append(timed(self.reconciler("plan", str(mdir)), env, what=f"no-op plan at N={n}"))
                    else:
                        flo.append(timed(self.floor_read(), env, what=f"floor read at N={n}"))
            # A run = one plan and the floor read next to it (alternating order): its ratio.
            ratios = [a.seconds / b.seconds for a, b in zip(rec, flo)]
            row = {"n": n, **counts, "host": host, "setup_apply_s": create.seconds,
                   "plan_s": median(rec), "floor_s": median(flo), "ratio": median(rec) / median(flo),
                   "ratio_median": statistics.median(ratios), "ratio_worst": max(ratios),
                   "ratio_runs": [round(x, 2) for x in ratios],
                   "plan_rss_mib": max(r.rss_mib for r in rec), "floor_rss_mib": max(r.rss_mib for r in flo),
                   "plan_runs_s": [round(r.seconds, 3) for r in rec], "floor_runs_s": [round(r.seconds, 3) for r in flo]}
            self.results["scale"].append(row)
            say(f"  N={n}: plan {row['plan_s']:.3f}s  floor {row['floor_s']:.3f}s  "
                f"ratio {row['ratio_median']:.2f}x (runs {', '.join(f'{x:.2f}' for x in ratios)})  "
                f"plan RSS {row['plan_rss_mib']:.0f} MiB  (setup apply {create.seconds:.1f}s)")
            if n == self.args.peer_compare_n:
                row["apply_noop_s"] = timed(self.reconciler("apply", "--quiet", str(mdir)), env,
                                            what=f"no-op apply at N={n}").seconds
            if n == self.args.watch_n and not self.args.no_watch:
                say(f"  watch over N={n}: idle {self.args.watch_idle:g}s, then {self.args.watch_reps} drifts of each kind ...")
                self.watch(mdir, n, counts)
        self.fleet_dir = mdir

    def watch(self, mdir: Path, n: int, counts: dict) -> None:
        import watch_cost
        p = self.prefix
        topic = role = broker = None
        if self.broker is not None:
            topic = (f"bench/{p}site0/gw00000/config", {"interval": 30, "gw": 0})
            role = (f"{p}role0000", {"type": "subscribePattern", "topic": f"bench/{p}r0/#"})
            broker = (self.broker.url, self.broker.password)
        try:
            self.results["watch"] = {"n": n, **watch_cost.measure(
                mdir, self.env(), self.conn, [f"{p}vm{i:05d}" for i in range(0, n, max(1, n // 10))][:10],
                topic, role, reps=self.args.watch_reps, idle_s=self.args.watch_idle, broker=broker,
                say=lambda t: say(t))}
        except (RuntimeError, TimeoutError) as e:
            self.results["watch"] = {"n": n, "failed": str(e)}
            say(f"  WATCH FAILED: {e}")

    def levers(self) -> None:
        """One in-process pass over the largest fleet, phase by phase, with each lever's alternative."""
        env = self.env()
        r = timed([PY, str(ROOT / "bench" / "levers.py"), str(self.fleet_dir)], env, what="bench/levers.py")
        self.results["levers"] = json.loads(r.out.strip().splitlines()[-1])

    def startup(self) -> None:
        env = self.env()
        reps = max(3, self.args.reps)
        bare = [timed([PY, "-c", "pass"], env) for _ in range(reps)]
        helps = [timed(self.reconciler("--help"), env) for _ in range(reps)]
        val = [timed(self.reconciler("validate", str(self.fleet_dir)), env) for _ in range(reps)]
        imp = timed([PY, "-X", "importtime", "-m", "reconciler", "--help"], env)
        heavy = sorted({line.split("|")[-1].strip() for line in imp.err.splitlines()
                        if line.startswith("import time:") and any(m in line.split("|")[-1]
                        for m in (" libvirt", " paho", " jsonschema", " yaml", " deepdiff"))})
        self.results["startup"] = {"python_s": median(bare), "help_s": median(helps), "validate_s": median(val),
                                   "validate_n": self.args.sizes[-1], "heavy_imports_at_help": heavy}

    # ---------------------------------------------------------------- peer

    def peer_install(self) -> str | None:
        """The Ansible peer's venv; None when it is ready, else why it is not."""
        ap = PEER_VENV / "bin" / "ansible-playbook"
        if ap.exists() and subprocess.run([str(PEER_VENV / "bin" / "python"), "-c", "import libvirt, lxml"],
                                          capture_output=True).returncode == 0:
            return None
        say(f"  installing the peer into {PEER_VENV.relative_to(ROOT)}: pip install {' '.join(PEER_PACKAGES)} ...")
        try:
            if not (PEER_VENV / "bin" / "python").exists():
                subprocess.run([os.path.join(sys.base_prefix, "bin", "python3"), "-m", "venv", str(PEER_VENV)],
                               check=True, capture_output=True, timeout=300)
            r = subprocess.run([str(PEER_VENV / "bin" / "pip"), "install", "-q", *PEER_PACKAGES],
                               capture_output=True, text=True, timeout=900)
        except (subprocess.SubprocessError, OSError) as e:
            return f"could not create the venv or run pip: {e}"
        if r.returncode != 0 or not ap.exists():
            lines = [l for l in (r.stderr or r.stdout).splitlines() if "ERROR" in l or "rror" in l][-3:]
            return "pip install failed: " + (" | ".join(lines) or f"exit {r.returncode}")
        return None

    def peer_versions(self) -> dict:
        out = subprocess.run([str(PEER_VENV / "bin" / "python"), "-c",
                              "import importlib.metadata as m, json, pathlib, ansible_collections.community.libvirt as c\n"
                              "man = json.loads((pathlib.Path(c.__path__[0]) / 'MANIFEST.json').read_text())\n"
                              "print(json.dumps({'ansible': m.version('ansible'), 'ansible-core': m.version('ansible-core'),"
                              "'community.libvirt': man['collection_info']['version'],"
                              "'libvirt-python': m.version('libvirt-python')}))"],
                             capture_output=True, text=True)
        try:
            return json.loads(out.stdout)
        except ValueError:
            return {}

    def peer(self) -> None:
        n = self.args.peer_n
        if self.args.no_peers:
            self.results["peer"] = {"skipped": "--no-peers"}
            return
        why = self.peer_install()
        if why:
            self.results["peer"] = {"skipped": f"Ansible could not be installed here: {why}"}
            say(f"  PEER SKIPPED: {self.results['peer']['skipped']}")
            return
        p = f"{self.prefix}p-"
        mdir = self.tmp / "peer-manifests"
        write_vms_only(mdir, p, n)
        import yaml
        pdir = self.tmp / "peer"
        pdir.mkdir()
        (pdir / "vms.yml").write_text(yaml.safe_dump({"vms": [{"name": name, "xml": xml} for name, xml in domain_xmls(mdir)]},
                                                     width=10_000))
        (pdir / "play.yml").write_text(PLAYBOOK.replace("URI", URI))
        env = self.env()
        env.update(ANSIBLE_PYTHON_INTERPRETER=str(PEER_VENV / "bin" / "python"), ANSIBLE_NOCOLOR="1",
                   ANSIBLE_LOCALHOST_WARNING="False", ANSIBLE_HOME=str(pdir / "home"),
                   ANSIBLE_LOCAL_TEMP=str(pdir / "tmp"), ANSIBLE_RETRY_FILES_ENABLED="False")
        playbook = [str(PEER_VENV / "bin" / "ansible-playbook"), "-i", "localhost,", str(pdir / "play.yml")]
        first = timed(playbook, env, what="ansible-playbook (create)")
        rerun = timed(playbook, env, what="ansible-playbook (rerun)")
        recap = [l for l in rerun.out.splitlines() if "localhost" in l and "changed=" in l]
        running = sum(1 for d in self.conn.listAllDomains(0) if d.name().startswith(p) and d.isActive())
        self.remove_domains(p)
        r1 = timed(self.reconciler("apply", str(mdir)), env, what="reconciler apply (peer comparison)")
        r2 = timed(self.reconciler("apply", str(mdir)), env, what="reconciler apply rerun")
        self.remove_domains(p)
        self.results["peer"] = {
            "vms": n, "versions": self.peer_versions(), "uri": URI,
            "ansible_create_s": first.seconds, "ansible_rerun_s": rerun.seconds,
            "ansible_rerun_recap": " ".join(recap[-1].split(":", 1)[-1].split()[:3]) if recap else "", "ansible_running_after": running,
            "ansible_rss_mib": max(first.rss_mib, rerun.rss_mib),
            "reconciler_create_s": r1.seconds, "reconciler_rerun_s": r2.seconds,
            "reconciler_rerun_recap": next((l for l in r2.out.splitlines() if l.startswith("ok=")), "")}

    # ---------------------------------------------------------------- report

    def report(self) -> bool:
        res = self.results
        say()
        say("=" * 100)
        m = res["machine"]
        say(f"machine: {m['cpus']} CPUs, {m['mem_gib']:.0f} GiB, {m['platform']}; Python {m['python']}, "
            f"libvirt {m['libvirt']}, libvirt-python {m['libvirt_python']}, {m['mosquitto']}")
        say(f"target: {URI} (libvirtd test hypervisor); broker: {'local Mosquitto, dynamic security' if self.broker or res.get('mqtt') else 'none (--no-mqtt)'}")
        say("every figure: whole processes, wall time spawn-to-exit, median of the repetitions; RSS = that process's peak")
        ok = True
        rows = res.get("scale", [])
        if rows:
            say()
            say(f"NO-OP PLAN vs API FLOOR ({self.args.reps} repetitions each, alternating)")
            cols = [f"N={r['n']}" for r in rows]
            def line(label, vals, fmt):
                say(f"  {label:<38}" + "".join(f"{fmt(v):>16}" for v in vals))
            line("", cols, str)
            line("VMs / disks", [f"{r['vms']}/{r['disks']}" for r in rows], str)
            if "topics" in rows[0]:
                line("Topics / clients / roles / groups", [f"{r['topics']}/{r['clients']}/{r['roles']}/{r['groups']}" for r in rows], str)
            line("domains / volumes on the host (all)", [f"{r['host']['domains']}/{r['host']['volumes']}" for r in rows], str)
            line("reconciler plan (s)", [r["plan_s"] for r in rows], lambda v: f"{v:.3f}")
            line("API floor (s)", [r["floor_s"] for r in rows], lambda v: f"{v:.3f}")
            line("ratio of the medians", [r["ratio"] for r in rows], lambda v: f"{v:.2f}x")
            line(f"median run's ratio (target <= {TARGET_PLAN_RATIO:g}x)", [r["ratio_median"] for r in rows], lambda v: f"{v:.2f}x")
            line(f"worst run's ratio (target <= {TARGET_PLAN_WORST:g}x)", [r["ratio_worst"] for r in rows], lambda v: f"{v:.2f}x")
            for i in range(self.args.reps):
                line(f"  run {i + 1}: plan / floor (s)", [f"{r['plan_runs_s'][i]:.2f}/{r['floor_runs_s'][i]:.2f}"
                                                         if i < len(r["plan_runs_s"]) else "" for r in rows], str)
            line("plan per VM (ms)", [1000 * r["plan_s"] / r["n"] for r in rows], lambda v: f"{v:.2f}")
            line("floor per VM (ms)", [1000 * r["floor_s"] / r["n"] for r in rows], lambda v: f"{v:.2f}")
            line(f"plan peak RSS (MiB, target < {TARGET_RSS_MIB})", [r["plan_rss_mib"] for r in rows], lambda v: f"{v:.0f}")
            line("floor peak RSS (MiB)", [r["floor_rss_mib"] for r in rows], lambda v: f"{v:.0f}")
            line("apply creating it (s, setup, once)", [r["setup_apply_s"] for r in rows], lambda v: f"{v:.1f}")
            if len(rows) >= 2:
                a, b = rows[-2], rows[-1]
                # Linear: the marginal cost per VM between the smallest and largest size vs the smallest's average.
                marginal = (b["plan_s"] - a["plan_s"]) / (b["n"] - a["n"])
                fmarginal = (b["floor_s"] - a["floor_s"]) / (b["n"] - a["n"])
                say(f"  growth N={a['n']} -> {b['n']}: plan +{1000 * marginal:.2f} ms per extra VM (floor +{1000 * fmarginal:.2f} ms, "
                    f"{marginal / fmarginal if fmarginal > 0 else float('inf'):.2f}x); "
                    f"x{b['n'] / a['n']:.0f} fleet -> plan x{b['plan_s'] / a['plan_s']:.2f}, floor x{b['floor_s'] / a['floor_s']:.2f}")
                res["growth"] = {"from": a["n"], "to": b["n"], "plan_ms_per_vm": 1000 * marginal,
                                 "floor_ms_per_vm": 1000 * fmarginal,
                                 "multiple": marginal / fmarginal if fmarginal > 0 else None}
        if "levers" in res and rows:
            lv, big = res["levers"], rows[-1]
            say()
            say(f"WHERE THE NO-OP PLAN'S TIME GOES at N={big['n']} (bench/levers.py: one in-process pass, phase by phase)")
            def lrow(label, now, lever="", alt=None):
                say(f"  {label:<34}{now:>9.3f}s   {lever:<46}" + (f"{alt:>9.3f}s" if alt is not None else ""))
            lrow("imports (core + providers)", lv["import_core_s"] + lv["import_providers_s"])
            lrow(f"YAML parse ({lv['documents']} documents)", lv["yaml_s"], "with Python's default GC thresholds:",
                 lv["yaml_default_gc_s"])
            if "yaml_cached_s" in lv:
                lrow("  the same from the parse cache", lv["yaml_cached_s"], "(kept: a plan's second run reads it)")
            lrow("JSON Schema check (jsonschema-rs)", lv["schema_rs_s"], "with jsonschema (kept for error messages):",
                 lv["schema_py_s"])
            lrow("kind rules, normalising, references", lv["build_s"] - lv["schema_rs_s"])
            lrow("libvirt read", lv["read_libvirt_s"],
                 f"of it: live XML of {lv.get('running_domains', 0)} running domains", lv.get("live_xml_sequential_s"))
            lrow("broker read", lv.get("read_mqtt_s", 0.0), "(3 lists in one request + 1 sweep)")
            lrow("planning", lv["plan_s"])
        if "watch" in res:
            wt = res["watch"]
            say()
            say(f"WATCH over N={wt['n']} (`reconciler watch --interval 10m`; bench/watch_cost.py)")
            if "failed" in wt:
                say(f"  failed: {wt['failed']}")
            else:
                i = wt["idle"]
                say(f"  first round {wt['first_round']}; idle {i['seconds']:.0f}s: {i['cpu_s']:.3f} CPU-s = "
                    f"{i['cpu_s_per_min']:.3f} CPU-s per minute = {i['core_pct']:.2f}% of one core "
                    f"({i['rounds_during']} rounds meanwhile)")
                for key, label in (("vm_suspended", "VM suspended (libvirt event)"),
                                   ("retained_overwritten", "retained message overwritten"),
                                   ("acl_removed", "ACL removed (dynsec response)")):
                    if key in wt:
                        x = wt[key]
                        say(f"  corrected after {label:<32} median {x['median_s']:.2f}s  worst {x['worst_s']:.2f}s  "
                            f"of {x['n']}: {', '.join(f'{v:.2f}' for v in x['runs_s'])}")
        if "apply" in res:
            a = res["apply"]
            say()
            say(f"APPLY CREATING {a['vms']} VMs vs FLOOR define-and-start loop ({a['reps']} repetitions each)")
            say(f"  reconciler apply {a['reconciler_s']:.3f}s   floor {a['floor_s']:.3f}s   "
                f"ratio {a['ratio']:.2f}x (target <= {TARGET_APPLY_RATIO:g}x)   apply peak RSS {a['reconciler_rss_mib']:.0f} MiB")
        if "startup" in res:
            s = res["startup"]
            say()
            say("STARTUP")
            say(f"  python -c pass {s['python_s']:.3f}s   reconciler --help {s['help_s']:.3f}s   "
                f"reconciler validate ({s['validate_n']} VMs' manifests) {s['validate_s']:.3f}s")
            say(f"  heavy modules imported by --help: {', '.join(s['heavy_imports_at_help']) or 'none'}")
        if "peer" in res:
            p = res["peer"]
            say()
            if "skipped" in p:
                say(f"PEER: skipped - {p['skipped']}")
            else:
                v = p["versions"]
                say(f"PEER: ansible {v.get('ansible')} (ansible-core {v.get('ansible-core')}, community.libvirt "
                    f"{v.get('community.libvirt')}) `virt` module, {p['vms']} VMs on {p['uri']}")
                say(f"  {'':<30}{'create+start':>14}{'no-op rerun':>14}")
                say(f"  {'ansible-playbook':<30}{p['ansible_create_s']:>13.2f}s{p['ansible_rerun_s']:>13.2f}s   rerun: {p['ansible_rerun_recap']}")
                say(f"  {'reconciler apply':<30}{p['reconciler_create_s']:>13.2f}s{p['reconciler_rerun_s']:>13.2f}s   rerun: {p['reconciler_rerun_recap']}")
                say(f"  reconciler is {p['ansible_create_s'] / p['reconciler_create_s']:.0f}x faster to create, "
                    f"{p['ansible_rerun_s'] / p['reconciler_rerun_s']:.0f}x faster on the no-op rerun")
                big = next((r for r in rows if "apply_noop_s" in r), None)
                if big:
                    # Ansible's virt module costs the same per VM and task whatever the fleet (one module
                    # run per loop item): its rerun scales linearly; ours is measured at that size.
                    est = p["ansible_rerun_s"] * big["n"] / p["vms"]
                    p["extrapolated"] = {"n": big["n"], "ansible_rerun_s_est": est, "reconciler_apply_noop_s": big["apply_noop_s"]}
                    say(f"  at {big['n']} VMs: ansible rerun ~{est:.0f}s (extrapolated linearly from {p['vms']}: "
                        f"{p['ansible_rerun_s'] / p['vms']:.2f}s per VM), reconciler no-op apply {big['apply_noop_s']:.2f}s "
                        f"(measured, with {big.get('topics', 0)} Topics and {big.get('clients', 0)} clients besides) "
                        f"-> ~{est / big['apply_noop_s']:.0f}x")
        say()
        say("TARGETS")
        checks = []
        for r in rows:
            if r["n"] < 1000:
                continue
            checks.append((f"no-op plan at N={r['n']}: median run <= {TARGET_PLAN_RATIO:g}x floor",
                           r["ratio_median"] <= TARGET_PLAN_RATIO, f"{r['ratio_median']:.2f}x"))
            checks.append((f"no-op plan at N={r['n']}: worst run <= {TARGET_PLAN_WORST:g}x floor",
                           r["ratio_worst"] <= TARGET_PLAN_WORST, f"{r['ratio_worst']:.2f}x"))
        if rows:
            big = rows[-1]
            checks.append((f"no-op plan peak RSS at N={big['n']} < {TARGET_RSS_MIB} MiB", big["plan_rss_mib"] < TARGET_RSS_MIB, f"{big['plan_rss_mib']:.0f} MiB"))
        g = res.get("growth")
        if g and g.get("multiple") is not None:
            checks.append((f"growth per VM N={g['from']}->{g['to']} within {TARGET_GROWTH:g}x the floor's",
                           g["multiple"] <= TARGET_GROWTH, f"{g['multiple']:.2f}x (+{g['plan_ms_per_vm']:.2f} vs +{g['floor_ms_per_vm']:.2f} ms/VM)"))
        wt = res.get("watch")
        if wt and "failed" in wt:
            checks.append(("watch measured", False, wt["failed"]))
        elif wt:
            checks.append((f"watch corrects drift by hand within {TARGET_REACTION_S:g}s (worst of {wt['all']['n']})",
                           wt["all"]["worst_s"] <= TARGET_REACTION_S,
                           f"median {wt['all']['median_s']:.2f}s, worst {wt['all']['worst_s']:.2f}s"))
            checks.append((f"idle watch over {wt['n']} VMs < {100 * TARGET_IDLE_CORE:g}% of one core",
                           wt["idle"]["core_pct"] < 100 * TARGET_IDLE_CORE, f"{wt['idle']['core_pct']:.2f}%"))
        if "apply" in res:
            a = res["apply"]
            checks.append((f"apply creating {a['vms']} VMs <= {TARGET_APPLY_RATIO:g}x floor", a["ratio"] <= TARGET_APPLY_RATIO, f"{a['ratio']:.2f}x"))
        for label, met, value in checks:
            ok &= met
            say(f"  {'MET    ' if met else 'MISSED '} {label}: {value}")
        res["targets"] = [{"target": l, "met": m, "value": v} for l, m, v in checks]
        return ok


PLAYBOOK = """\
- hosts: localhost
  connection: local
  gather_facts: false
  vars_files: [vms.yml]
  tasks:
    - name: define the VMs
      community.libvirt.virt:
        command: define
        xml: "{{ item.xml }}"
        uri: URI
      loop: "{{ vms }}"
      loop_control: {label: "{{ item.name }}"}
    - name: start the VMs
      community.libvirt.virt:
        name: "{{ item.name }}"
        state: running
        uri: URI
      loop: "{{ vms }}"
      loop_control: {label: "{{ item.name }}"}
"""


def machine() -> dict:
    import libvirt
    mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2 ** 30
    v = libvirt.getVersion()
    try:
        mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    except (OSError, IndexError):
        mosq = "mosquitto ?"
    try:
        conn = libvirt.open(URI)
        lv = conn.getLibVersion()
        conn.close()
    except libvirt.libvirtError:
        lv = v
    from importlib.metadata import version
    return {"cpus": os.cpu_count(), "mem_gib": mem, "platform": platform.platform(), "python": platform.python_version(),
            "libvirt": f"{lv // 1000000}.{lv // 1000 % 1000}.{lv % 1000}", "libvirt_python": version("libvirt-python"),
            "mosquitto": mosq.replace(" running on ", " ").strip()}


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--sizes", default="100,1000,5000", help="fleet sizes in VMs (default 100,1000,5000)")
    ap.add_argument("--reps", type=int, default=5, help="repetitions of each timed no-op plan and floor read")
    ap.add_argument("--apply-n", type=int, default=500, help="VMs created in the apply comparison (default 500)")
    ap.add_argument("--apply-reps", type=int, default=3)
    ap.add_argument("--peer-n", type=int, default=100, help="VMs in the Ansible comparison (default 100)")
    ap.add_argument("--no-peers", action="store_true", help="skip the Ansible comparison")
    ap.add_argument("--no-mqtt", action="store_true", help="libvirt only: no broker, no MQTT objects")
    ap.add_argument("--watch-n", type=int, default=1000, help="fleet size the watch is measured over (one of --sizes)")
    ap.add_argument("--watch-reps", type=int, default=10, help="drifts of each kind the watch corrects")
    ap.add_argument("--watch-idle", type=float, default=60.0, help="seconds the idle watch's CPU is measured")
    ap.add_argument("--no-watch", action="store_true", help="skip the watch measurement")
    ap.add_argument("--peer-compare-n", type=int, default=1000,
                    help="fleet size whose no-op apply the Ansible peer is extrapolated to (one of --sizes)")
    ap.add_argument("--json", default=str(ROOT / ".run" / "bench-results.json"), help="write the figures here")
    a = ap.parse_args(argv)
    a.sizes = sorted(int(x) for x in a.sizes.split(","))
    return a


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    # Byte-compile first, as `pip install` does for an installed package: with PYTHONDONTWRITEBYTECODE
    # set (as in some shells and CI) every reconciler process would otherwise compile its ~60 modules
    # again (0.2-0.4 s each time), which the one-file floor never pays.
    subprocess.run([PY, "-m", "compileall", "-q", str(ROOT / "reconciler"), str(ROOT / "bench")], check=False,
                   stdout=subprocess.DEVNULL)
    tmp = Path(tempfile.mkdtemp(prefix="reconciler-bench-"))
    bench = Bench(args, tmp, prefix=f"bench{os.getpid()}-")
    # SIGTERM cleans up like Ctrl-C does.
    signal.signal(signal.SIGTERM, lambda *a: (_ for _ in ()).throw(KeyboardInterrupt()))
    t0 = time.monotonic()
    ok = False
    try:
        bench.open()
        bench.results["machine"] = machine()
        bench.results["mqtt"] = bench.broker is not None
        bench.results["command"] = "make bench  # = .venv/bin/python bench/bench.py " + " ".join(argv if argv is not None else sys.argv[1:])
        say(f"bench: objects prefixed {bench.prefix!r} on {URI}; temp dir {tmp}")
        if args.apply_n:
            say(f"apply: {args.apply_n} VMs, reconciler vs floor ...")
            bench.apply_vs_floor()
        say(f"scale: no-op plan vs floor at N = {', '.join(map(str, args.sizes))} ...")
        bench.scale()
        say("levers: where the time goes at the largest N ...")
        bench.levers()
        say("startup ...")
        bench.startup()
        if not args.no_peers:
            say(f"peer: ansible-playbook, {args.peer_n} VMs ...")
        bench.peer()
        ok = bench.report()
        bench.results["total_s"] = time.monotonic() - t0
        say(f"\nbench finished in {bench.results['total_s']:.0f}s; figures in {args.json}")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(bench.results, indent=2))
    except BenchError as e:
        say(f"bench failed: {e}")
        return 1
    except KeyboardInterrupt:
        say("bench interrupted; cleaning up")
        return 130
    finally:
        bench.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)
    # Missed targets are reported, not an error: `make bench` measures, it does not gate.
    return 0


if __name__ == "__main__":
    sys.exit(main())
