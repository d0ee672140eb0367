"""A local Mosquitto 2 broker with dynamic security and persistence, for `make demo` and the tests.

    python scripts/devbroker.py start --dir .run/broker --port 1883
    python scripts/devbroker.py stop --dir .run/broker
    python scripts/devbroker.py status --dir .run/broker

On first start DIR receives (mode 0700):

    mosquitto.conf           listener on 127.0.0.1:PORT only, dynamic security, persistence under DIR/data/
    dynamic-security.json    made by `mosquitto_ctrl dynsec init`, admin user `admin`
    admin.password           the admin's random password (mode 0600, no trailing newline)
    demo/*.password          random passwords of the demo clients that manifests/mqtt-edge.yaml reads
    mosquitto.pid, mosquitto.log

The admin role made by `dynsec init` may administer dynamic security and subscribe to `#`; this
module also grants it `publishClientSend #`, so that the reconciler can publish (and clear) the
retained messages of any topic and its sweep sentinel. A production broker may grant a subtree
instead (see README.md, "The local broker of make demo").

`start` is idempotent: a broker already running from DIR is left alone. The Python API
(`start(dir, port) -> Broker`, `Broker.stop()`) is what the test fixtures use.
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import pwd
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

ADMIN_USER = "admin"
DEMO_CLIENTS = ("sensor-01", "dashboard")
PLUGIN_CANDIDATES = (
    "/usr/lib/x86_64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/aarch64-linux-gnu/mosquitto_dynamic_security.so",
    "/usr/lib/*/mosquitto_dynamic_security.so",
    "/usr/lib/mosquitto_dynamic_security.so",
    "/usr/local/lib/mosquitto_dynamic_security.so",
    "/usr/lib64/mosquitto_dynamic_security.so",
)
# ACLs added to the admin role on first start (dynsec init already grants subscribe/receive on #).
ADMIN_EXTRA_ACLS = (
    {"acltype": "publishClientSend", "topic": "#", "allow": True},
)
START_TIMEOUT = 10.0


class DevBrokerError(Exception):
    """The local broker could not be set up or started."""


@dataclass
class Broker:
    dir: Path
    port: int
    pid: int
    username: str = ADMIN_USER

    @property
    def url(self) -> str:
        return f"mqtt://127.0.0.1:{self.port}"

    @property
    def password_file(self) -> Path:
        return self.dir / "admin.password"

    @property
    def password(self) -> str:
        return self.password_file.read_text().strip()

    def stop(self) -> None:
        stop(self.dir)


def _find_plugin() -> str:
    env = os.environ.get("RECONCILER_DYNSEC_PLUGIN")
    if env:
        return env
    for pattern in PLUGIN_CANDIDATES:
        for path in sorted(glob.glob(pattern)):
            if os.path.exists(path):
                return path
    raise DevBrokerError("mosquitto_dynamic_security.so not found (install the mosquitto package, "
                         "or set RECONCILER_DYNSEC_PLUGIN)")


def _find_binary(name: str) -> str:
    found = shutil.which(name) or next((p for p in (f"/usr/sbin/{name}", f"/usr/local/sbin/{name}")
                                        if os.access(p, os.X_OK)), None)
    if not found:
        raise DevBrokerError(f"{name} not found (install the mosquitto and mosquitto-clients packages)")
    return found


def _write_private(path: Path, text: str) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    os.fchmod(fd, 0o600)
    with os.fdopen(fd, "w") as f:
        f.write(text)


# The demo broker's queue for one session; None leaves Mosquitto's default (1000), as production brokers do.
DEMO_MAX_QUEUED = 100000


def _config(d: Path, port: int, tls: dict | None = None, max_queued: int | None = DEMO_MAX_QUEUED,
            listener_options: tuple[str, ...] = ()) -> str:
    extra = []
    if tls:
        extra = [f"listener {tls['port']} 127.0.0.1", f"certfile {tls['certfile']}", f"keyfile {tls['keyfile']}"]
    return "\n".join([
        "# Written by scripts/devbroker.py; regenerated on every start.",
        "per_listener_settings false",
        # Started as root, mosquitto would switch to the `mosquitto` user and lose access to DIR.
        f"user {pwd.getpwuid(os.geteuid()).pw_name}",
        "allow_anonymous false",
        f"listener {port} 127.0.0.1",
        *listener_options,
        f"plugin {_find_plugin()}",
        f"plugin_opt_config_file {d / 'dynamic-security.json'}",
        "persistence true",
        f"persistence_location {d / 'data'}/",
        "autosave_interval 60",
        # The retained sweep queues every retained message for the reconciler's session at once;
        # the default cap (1000) would drop the rest at fleet scale and a plan would see them missing.
        *([f"max_queued_messages {max_queued}"] if max_queued is not None else []),
        f"log_dest file {d / 'mosquitto.log'}",
        "log_type error",
        "log_type warning",
        "log_type notice",
        *extra,
        "",
    ])


def _init_dynsec(d: Path) -> None:
    dynsec = d / "dynamic-security.json"
    pwfile = d / "admin.password"
    if dynsec.exists():
        return
    password = secrets.token_urlsafe(24)
    tmp = d / "dynamic-security.json.tmp"
    if tmp.exists():
        tmp.unlink()
    # The password goes through stdin, never on a command line.
    proc = subprocess.run([_find_binary("mosquitto_ctrl"), "dynsec", "init", str(tmp), ADMIN_USER],
                          input=f"{password}\n{password}\n", text=True, capture_output=True, timeout=30)
    if proc.returncode != 0 or not tmp.exists():
        raise DevBrokerError(f"mosquitto_ctrl dynsec init failed: {proc.stderr.strip() or proc.stdout.strip()}")
    data = json.loads(tmp.read_text())
    for role in data.get("roles", []):
        if role.get("rolename") == ADMIN_USER:
            have = {(a["acltype"], a["topic"]) for a in role.setdefault("acls", [])}
            for acl in ADMIN_EXTRA_ACLS:
                if (acl["acltype"], acl["topic"]) not in have:
                    role["acls"].append(dict(acl))
    _write_private(pwfile, password)
    _write_private(tmp, json.dumps(data, indent=2))
    os.replace(tmp, dynsec)


def _init_demo_secrets(d: Path) -> None:
    demo = d / "demo"
    demo.mkdir(mode=0o700, exist_ok=True)
    for name in DEMO_CLIENTS:
        p = demo / f"{name}.password"
        if not p.exists():
            _write_private(p, secrets.token_urlsafe(18))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().split(") ", 1)[1].startswith("Z"):
                return False
    except (OSError, IndexError):
        pass
    return True


def _pid(d: Path) -> int | None:
    try:
        pid = int((d / "mosquitto.pid").read_text().strip())
    except (OSError, ValueError):
        return None
    if not _alive(pid):
        return None
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        if str(d / "mosquitto.conf").encode() not in cmdline:
            return None
    except OSError:
        pass
    return pid


def _port_of(d: Path) -> int | None:
    try:
        for line in (d / "mosquitto.conf").read_text().splitlines():
            if line.startswith("listener "):
                return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def _accepts(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    """In the child before exec: SIGTERM when the process that started it dies (Linux)."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def start(dir: str | os.PathLike, port: int = 1883, *, tls: dict | None = None,
          die_with_parent: bool = False, max_queued_messages: int | None = DEMO_MAX_QUEUED,
          listener_options: tuple[str, ...] = ()) -> Broker:
    """Start (or find running) the broker of `dir` on 127.0.0.1:`port`. `tls` ({port, certfile, keyfile})
    adds a TLS listener on 127.0.0.1 (the tests' mqtts:// broker). `die_with_parent` (the test fixtures)
    stops the broker when the calling process dies without stopping it (a killed pytest).
    `max_queued_messages=None` leaves Mosquitto's default (1000): a broker as production runs it.
    `listener_options` are lines for the plain listener (`use_username_as_clientid true`)."""
    d = Path(dir).resolve()
    d.mkdir(parents=True, exist_ok=True, mode=0o700)
    pid = _pid(d)
    if pid is not None:
        return Broker(d, _port_of(d) or port, pid)
    _init_dynsec(d)
    _init_demo_secrets(d)
    (d / "data").mkdir(mode=0o700, exist_ok=True)
    if _accepts(port):
        raise DevBrokerError(f"127.0.0.1:{port} is already in use by another process (the distribution's "
                             "mosquitto service? `systemctl disable --now mosquitto`, or choose another --port)")
    conf = d / "mosquitto.conf"
    _write_private(conf, _config(d, port, tls, max_queued_messages, tuple(listener_options)))
    log = open(d / "mosquitto.log", "ab")
    try:
        proc = subprocess.Popen([_find_binary("mosquitto"), "-c", str(conf)], stdin=subprocess.DEVNULL,
                                stdout=log, stderr=log, start_new_session=True, close_fds=True,
                                preexec_fn=_die_with_parent if die_with_parent else None)
    finally:
        log.close()
    (d / "mosquitto.pid").write_text(f"{proc.pid}\n")
    deadline = time.monotonic() + START_TIMEOUT
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            tail = (d / "mosquitto.log").read_text(errors="replace").strip().splitlines()[-5:]
            raise DevBrokerError(f"mosquitto exited with code {proc.returncode}: " + " | ".join(tail))
        if _accepts(port):
            return Broker(d, port, proc.pid)
        time.sleep(0.05)
    proc.kill()
    raise DevBrokerError(f"mosquitto did not accept connections on 127.0.0.1:{port} within {START_TIMEOUT:.0f} s")


def stop(dir: str | os.PathLike, timeout: float = 10.0) -> bool:
    """Stop the broker of `dir` (SIGTERM, then SIGKILL). True if one was running."""
    d = Path(dir).resolve()
    pid = _pid(d)
    if pid is None:
        return False
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            # Reap it if it is our child (the test fixtures start it from this process).
            if os.waitpid(pid, os.WNOHANG)[0] == pid:
                break
        except ChildProcessError:
            pass
        if not _alive(pid):
            break
        time.sleep(0.05)
    else:
        os.kill(pid, signal.SIGKILL)
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    try:
        (d / "mosquitto.pid").unlink()
    except OSError:
        pass
    return True


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/devbroker.py", description=__doc__.split("\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    s = sub.add_parser("start", help="start the broker of DIR (creating DIR on first start)")
    s.add_argument("--dir", required=True)
    s.add_argument("--port", type=int, default=1883)
    for name, help in (("stop", "stop the broker of DIR"), ("status", "exit 0 if the broker of DIR runs")):
        c = sub.add_parser(name, help=help)
        c.add_argument("--dir", required=True)
    args = p.parse_args(argv)
    try:
        if args.command == "start":
            was = _pid(Path(args.dir).resolve())
            b = start(args.dir, args.port)
            state = "already running" if was else "started"
            print(f"devbroker: {state} on {b.url} (pid {b.pid}); admin user {b.username!r}, "
                  f"password in {b.password_file}")
        elif args.command == "stop":
            print("devbroker: stopped" if stop(args.dir) else "devbroker: not running")
        else:
            pid = _pid(Path(args.dir).resolve())
            print(f"devbroker: running (pid {pid})" if pid else "devbroker: not running")
            return 0 if pid else 3
    except (DevBrokerError, OSError, subprocess.SubprocessError) as e:
        print(f"devbroker: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
