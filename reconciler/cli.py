"""Command line: parse arguments, choose the output, map outcomes to exit codes. No reconciling logic."""
from __future__ import annotations

import argparse
import os
import sys

from .errors import ReconcilerError
from .kinds.registry import NAMES as KINDS

EXIT_OK, EXIT_ERROR, EXIT_PENDING = 0, 1, 2


def _duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    t = text.strip()
    for u in ("ms", "s", "m", "h"):
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            return float(t[: -len(u)]) * units[u]
    if t.replace(".", "", 1).isdigit():
        return float(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not a duration (use 30s, 5m, 1h)")


def _common(p: argparse.ArgumentParser, targets: bool = True) -> None:
    p.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format (default text)")
    p.add_argument("--diff", action="store_true", help="show field-level before/after in text output")
    p.add_argument("--quiet", action="store_true", help="print only changes, failures and the recap")
    p.add_argument("--verbose", action="store_true", help="print more detail to stderr")
    p.add_argument("--metrics-file", metavar="PATH", help="write Prometheus metrics here (atomically)")
    if targets:
        env = os.environ.get
        p.add_argument("--libvirt-uri", default=env("RECONCILER_LIBVIRT_URI", "qemu:///system"),
                       help="libvirt connection (env RECONCILER_LIBVIRT_URI; default qemu:///system)")
        p.add_argument("--mqtt-url", default=env("RECONCILER_MQTT_URL", "mqtt://127.0.0.1:1883"),
                       help="broker, mqtt://host:port or mqtts:// (env RECONCILER_MQTT_URL)")
        p.add_argument("--mqtt-username", default=env("RECONCILER_MQTT_USERNAME"),
                       help="broker admin login (env RECONCILER_MQTT_USERNAME; password from "
                            "RECONCILER_MQTT_PASSWORD or RECONCILER_MQTT_PASSWORD_FILE)")
        p.add_argument("--mqtt-cafile", default=env("RECONCILER_MQTT_CAFILE"), help="CA file for mqtts://")
        p.add_argument("--inventory", metavar="FILE", help="reconcile the hosts of an Inventory file instead")
        p.add_argument("--forks", type=int, default=10, help="hosts reconciled in parallel (default 10)")
        p.add_argument("--limit", metavar="NAME", help="only this inventory host")


def _scope(text: str) -> str:
    import re
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid scope name")
    return text


def _change_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prune", action="store_true", help="delete managed objects that no manifest declares")
    p.add_argument("--scope", type=_scope, default=os.environ.get("RECONCILER_SCOPE", "default"),
                   help="ownership scope written into markers; --prune only deletes objects of this scope "
                        "(env RECONCILER_SCOPE; default 'default')")
    p.add_argument("--force", action="store_true", help="allow a prune of more than half of a kind's managed objects")


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which `plan` uses for "changes pending": a CI script would
    read a typo as drift. Usage errors exit 1, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="reconciler", description="Make libvirt and Mosquitto match YAML manifests.")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    v = sub.add_parser("validate", help="check manifests offline")
    v.add_argument("paths", nargs="+", metavar="PATH")
    _common(v, targets=False)

    pl = sub.add_parser("plan", help="show what apply would change (exit 0 in sync, 2 pending, 1 error)")
    pl.add_argument("paths", nargs="*", metavar="PATH")
    _change_flags(pl)
    _common(pl)

    a = sub.add_parser("apply", help="make live state match the manifests")
    a.add_argument("paths", nargs="*", metavar="PATH")
    _change_flags(a)
    a.add_argument("--check", action="store_true", help="only plan (same output and exit codes as plan)")
    a.add_argument("--allow-restart", action="store_true", help="restart VMs whose changes need it")
    a.add_argument("--allow-replace", action="store_true", help="redefine VMs whose hypervisor, arch or machine changed")
    a.add_argument("--lock-timeout", type=_duration, default=os.environ.get("RECONCILER_LOCK_TIMEOUT", "300s"),
                   help="how long to wait for another run on the same target (default 300s)")
    a.add_argument("--shutdown-timeout", type=_duration, default=os.environ.get("RECONCILER_SHUTDOWN_TIMEOUT", "60s"),
                   help="graceful shutdown time before a VM is forced off (default 60s)")
    _common(a)

    w = sub.add_parser("watch", help="reconcile in a loop until SIGTERM/SIGINT")
    w.add_argument("paths", nargs="*", metavar="PATH")
    w.add_argument("--interval", type=_duration, default=60.0, help="time between rounds (default 60s)")
    _change_flags(w)
    w.add_argument("--allow-restart", action="store_true")
    w.add_argument("--allow-replace", action="store_true")
    w.add_argument("--lock-timeout", type=_duration, default=os.environ.get("RECONCILER_LOCK_TIMEOUT", "300s"))
    w.add_argument("--shutdown-timeout", type=_duration, default=os.environ.get("RECONCILER_SHUTDOWN_TIMEOUT", "60s"))
    _common(w)

    e = sub.add_parser("export", help="print live state as manifests")
    e.add_argument("--all", action="store_true", help="include objects the reconciler does not manage (adopts them)")
    e.add_argument("--kind", choices=KINDS, action="append", help="only this kind (repeatable)")
    _common(e)

    from .backups import add_arguments as backups_flags
    backups_flags(sub.add_parser("backups", help="list the backups in the host's pools (time, size, VM, disks)"))
    return ap


def _targets(args):
    from .run import Targets
    password = os.environ.get("RECONCILER_MQTT_PASSWORD")
    pw_file = os.environ.get("RECONCILER_MQTT_PASSWORD_FILE")
    if password is None and pw_file:
        try:
            with open(pw_file, encoding="utf-8") as f:
                password = f.read().strip()
        except OSError as e:
            raise ReconcilerError(f"cannot read RECONCILER_MQTT_PASSWORD_FILE {pw_file}: {e.strerror}") from None
    return Targets(args.libvirt_uri, args.mqtt_url, args.mqtt_username, password, args.mqtt_cafile)


def _options(args):
    from .model import Options
    return Options(prune=getattr(args, "prune", False), force=getattr(args, "force", False),
                   allow_restart=getattr(args, "allow_restart", False),
                   allow_replace=getattr(args, "allow_replace", False),
                   shutdown_timeout=getattr(args, "shutdown_timeout", 60.0),
                   scope=getattr(args, "scope", "default"))


def _output(args):
    from .run import Output
    return Output(args.output, args.diff, args.quiet, args.verbose, args.metrics_file)


def cmd_validate(args) -> int:
    from . import manifest
    resources = manifest.load(args.paths)
    if args.output == "json":
        import json
        print(json.dumps({"valid": True, "resources": len(resources)}))
    elif not args.quiet:
        counts: dict[str, int] = {}
        for r in resources:
            counts[r.id.kind] = counts.get(r.id.kind, 0) + 1
        detail = ", ".join(f"{k}={v}" for k, v in counts.items()) or "nothing declared"
        print(f"valid: {len(resources)} resources ({detail})")
    return EXIT_OK


def _paths_or_inventory(args) -> None:
    if args.inventory and args.paths:
        raise ReconcilerError("give manifest paths or --inventory, not both (the inventory names each host's manifests)")
    if not args.inventory and not args.paths:
        raise ReconcilerError(f"{args.command} needs manifest paths (or --inventory FILE)")


def cmd_plan_apply(args, apply: bool) -> int:
    _paths_or_inventory(args)
    if args.inventory:
        from .inventory import run_inventory
        return run_inventory(args, apply=apply)
    from .run import reconcile
    return reconcile(args.paths, _targets(args), _options(args), _output(args), apply=apply,
                     lock_timeout=getattr(args, "lock_timeout", 300.0))


def cmd_watch(args) -> int:
    _paths_or_inventory(args)
    from .watch import watch
    return watch(args, _targets(args), _options(args), _output(args))


def cmd_export(args) -> int:
    from .export import export
    return export(args, _targets(args))


def main(argv: list[str] | None = None) -> int:
    import gc
    # A run builds hundreds of thousands of small, acyclic objects (YAML nodes, specs) that live to
    # the end; the default thresholds rescan them over and over (0.6 s of 1.0 s parsing 3,410
    # documents). Reference counting frees them as always; cycles are still collected, just rarer.
    gc.set_threshold(200_000, 50, 100)
    args = parser().parse_args(argv)
    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "backups":
            from .backups import run_backups
            return run_backups(args)
        if args.command == "plan":
            return cmd_plan_apply(args, apply=False)
        if args.command == "apply":
            return cmd_plan_apply(args, apply=not args.check)
        if args.command == "watch":
            return cmd_watch(args)
        if args.command == "export":
            return cmd_export(args)
    except ReconcilerError as e:
        print(f"error: {e}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
