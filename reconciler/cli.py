"""Command line: parse arguments into one RunConfig, run, render the Outcome at the edge (text, JSON,
metrics), map it to an exit code. The only module that uses argparse; nothing imports it but
__main__. No reconciling logic."""
from __future__ import annotations

import argparse
import os
import sys

from . import __version__
from .config import Output, RunConfig, Targets, broker_password
from .errors import ReconcilerError
from .kinds.registry import NAMES as KINDS
from .model import Options
from .outcome import EXIT_ERROR, EXIT_OK, Outcome, RunError
from .render.show import show
from . import saved

SCOPE_FILE = ".reconciler.yaml"


def _duration(text: str) -> float:
    units = {"ms": 0.001, "s": 1, "m": 60, "h": 3600}
    t = text.strip()
    for u in ("ms", "s", "m", "h"):
        if t.endswith(u) and t[: -len(u)].replace(".", "", 1).isdigit():
            return float(t[: -len(u)]) * units[u]
    if t.replace(".", "", 1).isdigit():
        return float(t)
    raise argparse.ArgumentTypeError(f"{text!r} is not a duration (use 30s, 5m, 1h)")


def _short_duration(text: str) -> float:
    """0 to 60 seconds: 1s, 500ms, 0."""
    value = _duration(text)
    if value > 60:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (0 to 60 s)")
    return value


def _scope(text: str) -> str:
    import re
    if not re.match(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,62}\Z", text):
        raise argparse.ArgumentTypeError(f"{text!r} is not a valid scope name")
    return text


class _Parser(argparse.ArgumentParser):
    """argparse exits 2 on a usage error, which `plan` uses for "changes pending": a CI script would
    read a typo as drift. Usage errors exit 1, like every other error."""

    def error(self, message: str):
        self.exit(EXIT_ERROR, f"error: {message} (see {self.prog} --help)\n")


def _output_flags(p: argparse.ArgumentParser, diff: bool = True, metrics: bool = True, formats=("text", "json")) -> None:
    p.add_argument("-o", "--output", choices=formats, default="text", help=f"output format: {' | '.join(formats)} (default text)")
    if diff:
        p.add_argument("--diff", action="store_true", help="show field-level before/after in text output")
    p.add_argument("--quiet", action="store_true", help="print only changes, failures and the recap")
    p.add_argument("--verbose", action="store_true", help="print more detail to stderr")
    if metrics:
        p.add_argument("--metrics-file", metavar="PATH", help="write Prometheus metrics here (atomically), success or not")


def _target_flags(p: argparse.ArgumentParser, inventory: bool = True) -> None:
    env = os.environ.get
    p.add_argument("--libvirt-uri", default=env("RECONCILER_LIBVIRT_URI", "qemu:///system"),
                   help="libvirt connection (env RECONCILER_LIBVIRT_URI; default qemu:///system)")
    p.add_argument("--mqtt-url", default=env("RECONCILER_MQTT_URL", "mqtt://127.0.0.1:1883"),
                   help="broker, mqtt://host:port or mqtts:// (env RECONCILER_MQTT_URL)")
    p.add_argument("--mqtt-username", default=env("RECONCILER_MQTT_USERNAME"),
                   help="broker admin login (env RECONCILER_MQTT_USERNAME; password from "
                        "RECONCILER_MQTT_PASSWORD or RECONCILER_MQTT_PASSWORD_FILE)")
    p.add_argument("--mqtt-cafile", default=env("RECONCILER_MQTT_CAFILE"), help="CA file for mqtts://")
    if inventory:
        p.add_argument("--inventory", metavar="FILE", help="reconcile the hosts of an Inventory file instead")
        p.add_argument("--forks", type=int, default=10, help="hosts reconciled in parallel (default 10)")
        p.add_argument("--limit", metavar="NAME", help="only these inventory hosts (names or patterns, comma-separated)")


def _scope_flags(p: argparse.ArgumentParser, prune: bool = True) -> None:
    if prune:
        p.add_argument("--prune", action="store_true", help="delete managed objects of this scope that no manifest declares "
                                                            "(needs an explicit --scope, RECONCILER_SCOPE or a .reconciler.yaml)")
        p.add_argument("--force", action="store_true", help="allow a prune of more than half of a kind's managed objects")
    p.add_argument("--scope", type=_scope, default=None,
                   help="ownership scope written into markers; --prune only deletes objects of this scope "
                        f"(env RECONCILER_SCOPE, or `scope:` in {SCOPE_FILE} at the manifests' root; default 'default')")


def _allow_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--allow-restart", action="store_true", help="restart VMs (and networks) whose changes need it")
    p.add_argument("--allow-replace", action="store_true", help="redefine VMs whose hypervisor, arch or machine changed")


def _apply_flags(p: argparse.ArgumentParser) -> None:
    env = os.environ.get
    p.add_argument("--lock-timeout", type=_duration, default=env("RECONCILER_LOCK_TIMEOUT", "300s"),
                   help="how long to wait for another run on the same target (default 300s)")
    p.add_argument("--shutdown-timeout", type=_duration, default=env("RECONCILER_SHUTDOWN_TIMEOUT", "60s"),
                   help="graceful shutdown time before a VM is forced off (default 60s)")


def parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="reconciler", description="Make libvirt and Mosquitto match YAML manifests.")
    ap.add_argument("--version", action="version", version=f"reconciler {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=_Parser)

    v = sub.add_parser("validate", help="check manifests offline")
    v.add_argument("paths", nargs="+", metavar="PATH")
    _output_flags(v, diff=False, metrics=False)

    pl = sub.add_parser("plan", help="show what apply would change (exit 0 in sync, 2 pending, 1 error)")
    pl.add_argument("paths", nargs="*", metavar="PATH")
    _scope_flags(pl)
    _allow_flags(pl)   # they change the plan: a held restart is pending, an allowed one is planned
    pl.add_argument("--out", metavar="FILE", help="also save the plan to FILE (with --inventory: a folder, one file "
                                                  "per host) for `apply FILE` and `show FILE`")
    _target_flags(pl)
    _output_flags(pl)

    sh = sub.add_parser("show", help="print a saved plan as plan prints it (exit 0 in sync, 2 pending, 1 refused)")
    sh.add_argument("file", metavar="FILE")
    _output_flags(sh, metrics=False)

    a = sub.add_parser("apply", help="make live state match the manifests, or apply a saved plan FILE exactly")
    a.add_argument("paths", nargs="*", metavar="PATH", help="manifest files or folders, or one saved plan file")
    _scope_flags(a)
    a.add_argument("--check", action="store_true", help="only plan (same output and exit codes as plan)")
    _allow_flags(a)
    _apply_flags(a)
    _target_flags(a)
    _output_flags(a)

    w = sub.add_parser("watch", help="reconcile in a loop until SIGTERM/SIGINT")
    w.add_argument("paths", nargs="*", metavar="PATH")
    w.add_argument("--interval", type=_duration, default=60.0, help="time between full rounds (default 60s)")
    _scope_flags(w)
    _allow_flags(w)
    _apply_flags(w)
    _target_flags(w)
    _output_flags(w)

    e = sub.add_parser("export", help="print live state as manifests")
    e.add_argument("--all", action="store_true", help="include objects the reconciler does not manage (adopts them)")
    e.add_argument("--kind", choices=KINDS, action="append", help="only this kind (repeatable)")
    _scope_flags(e, prune=False)
    _target_flags(e, inventory=False)
    _output_flags(e, diff=False, metrics=False)

    st = sub.add_parser("status", help="VMs with their figures, the broker, and drift when PATHs are given (exit 0, 1 on an error)")
    st.add_argument("paths", nargs="*", metavar="PATH")
    _scope_flags(st, prune=False)
    _target_flags(st, inventory=False)
    _output_flags(st, diff=False, formats=("text", "json", "html"))
    st.add_argument("--sample", type=_short_duration, default=1.0, metavar="DURATION",
                    help="time between the two CPU samples (default 1s; 0: no CPU %%)")
    st.add_argument("--stats-timeout", type=_short_duration, default=10.0, metavar="DURATION",
                    help="how long the statistics call may take before VMs are asked one by one (default 10s)")

    b = sub.add_parser("backups", help="list the backups in the host's pools (time, size, VM, disks)")
    b.add_argument("--policy", metavar="NAME", help="only the backups of this BackupPolicy")
    b.add_argument("--vm", metavar="NAME", help="only the backups of this VM")
    b.add_argument("--libvirt-uri", default=os.environ.get("RECONCILER_LIBVIRT_URI", "qemu:///system"),
                   help="libvirt connection (env RECONCILER_LIBVIRT_URI; default qemu:///system)")
    b.add_argument("-o", "--output", choices=("text", "json"), default="text", help="output format (default text)")
    return ap


# --------------------------------------------------------------------------- arguments -> values

def _project_scope(paths: list[str]) -> str | None:
    """`scope:` from a .reconciler.yaml at the root of the manifest paths (all must agree)."""
    import yaml
    found: dict[str, str] = {}
    for p in paths:
        root = p if os.path.isdir(p) else os.path.dirname(os.path.abspath(p))
        f = os.path.join(root, SCOPE_FILE)
        if not os.path.isfile(f):
            continue
        try:
            with open(f, encoding="utf-8") as h:
                data = yaml.safe_load(h.read(64 * 1024)) or {}
        except (OSError, yaml.YAMLError) as e:
            raise ReconcilerError(f"{f}: cannot read the project file: {e}") from None
        scope = data.get("scope") if isinstance(data, dict) else None
        if not isinstance(scope, str):
            raise ReconcilerError(f"{f}: expected `scope: NAME` (a name such as site-a)")
        try:
            found[f] = _scope(scope)
        except argparse.ArgumentTypeError as e:
            raise ReconcilerError(f"{f}: {e}") from None
    if len(set(found.values())) > 1:
        raise ReconcilerError("the manifest paths name different scopes: "
                              + ", ".join(f"{v} ({k})" for k, v in found.items()))
    return next(iter(found.values()), None)


def config(args) -> RunConfig:
    """The one RunConfig of a command line (and its environment)."""
    paths = tuple(getattr(args, "paths", ()) or ())
    scope = getattr(args, "scope", None) or os.environ.get("RECONCILER_SCOPE")
    if not scope and args.command in ("plan", "apply") and len(paths) == 1 and saved.looks_saved(paths[0]):
        scope = saved.read(paths[0]).doc["target"]["scope"]   # a saved plan carries its scope
    scope = scope or _project_scope(list(paths))
    prune = getattr(args, "prune", False)
    if prune and not scope:
        raise ReconcilerError("--prune needs an explicit scope, so that two repositories on one host never prune "
                              "each other's objects: give --scope NAME, set RECONCILER_SCOPE, or write "
                              f"`scope: NAME` in {SCOPE_FILE} at the manifests' root")
    if getattr(args, "inventory", None) and paths:
        raise ReconcilerError("give manifest paths or --inventory, not both (the inventory names each host's manifests)")
    if args.command in ("plan", "apply", "watch") and not paths and not getattr(args, "inventory", None):
        raise ReconcilerError(f"{args.command} needs manifest paths (or --inventory FILE)")
    forks = getattr(args, "forks", 10)
    if forks is not None and forks < 1:
        raise ReconcilerError("--forks must be at least 1")
    interval = float(getattr(args, "interval", 60.0))
    if interval <= 0:
        raise ReconcilerError("--interval must be greater than zero")
    options = Options(prune=prune, force=getattr(args, "force", False),
                      allow_restart=getattr(args, "allow_restart", False),
                      allow_replace=getattr(args, "allow_replace", False),
                      shutdown_timeout=getattr(args, "shutdown_timeout", 60.0),
                      scope=scope or "default")
    targets = Targets()
    if hasattr(args, "libvirt_uri"):
        targets = Targets(args.libvirt_uri, args.mqtt_url, args.mqtt_username, broker_password(), args.mqtt_cafile)
    output = Output(args.output, getattr(args, "diff", False), args.quiet, args.verbose, getattr(args, "metrics_file", None))
    return RunConfig(paths, targets, options, output, getattr(args, "lock_timeout", 300.0),
                     getattr(args, "inventory", None), forks or 1, getattr(args, "limit", None), interval)


# --------------------------------------------------------------------------- rendering at the edge

def _error(e: ReconcilerError, out_format: str) -> int:
    """A usage or set-up error: one sentence on stderr, and with -o json the object on stdout too."""
    print(f"error: {e}", file=sys.stderr, flush=True)
    if out_format == "json":
        from .render import jsonout
        from .run import error_of
        jsonout.write(error_of(e).as_dict(), sys.stdout)
    return EXIT_ERROR


# --------------------------------------------------------------------------- commands

def cmd_validate(args) -> int:
    from . import manifests
    resources = manifests.load(args.paths)
    if args.output == "json":
        from .render import jsonout
        counts: dict[str, int] = {}
        for r in resources:
            counts[r.id.kind] = counts.get(r.id.kind, 0) + 1
        jsonout.write({"valid": True, "resources": len(resources), "kinds": counts}, sys.stdout)
    elif not args.quiet:
        counts = {}
        for r in resources:
            counts[r.id.kind] = counts.get(r.id.kind, 0) + 1
        detail = ", ".join(f"{k}={v}" for k, v in counts.items()) or "nothing declared"
        print(f"valid: {len(resources)} resources ({detail})")
    return EXIT_OK


def cmd_plan_apply(cfg: RunConfig, apply: bool, args=None) -> int:
    out_file = getattr(args, "out", None)
    if cfg.inventory:
        from .inventory import run_inventory
        return run_inventory(cfg, apply=apply, out_dir=out_file)
    from .progress import for_stderr
    from .render.text import TextRenderer
    from .run import reconcile
    out = cfg.output
    paths, options, review = list(cfg.paths), cfg.options, None
    if len(paths) == 1 and saved.looks_saved(paths[0]):
        plan_file = saved.read(paths[0])
        saved.check_target(plan_file, cfg.targets, cfg.options.scope, explicit_scope=bool(_explicit_scope(args)))
        saved.check_flags(plan_file, cfg.options, {k for k in ("prune", "force", "allow_restart", "allow_replace")
                                                  if getattr(args, k, False)})
        paths, options, review = plan_file.paths, plan_file.options(cfg.options.shutdown_timeout), saved.reviewer(plan_file)
    text = TextRenderer(sys.stdout, out) if out.format == "text" else None
    say = (lambda m: print(m, file=sys.stderr)) if out.verbose else None
    o = reconcile(paths, cfg.targets, options, apply=apply, lock_timeout=cfg.lock_timeout,
                  on_result=text.result if text else None, progress=for_stderr(out) if apply else None, say=say,
                  review=review)
    show(o, out, text)
    if out.metrics_file:
        _metrics(out.metrics_file, [o])
    if out_file and o.plan is not None:
        saved.write(out_file, saved.document(o, paths, cfg.targets, options))
        if out.format == "text" and not out.quiet:
            print(f"plan saved to {out_file}: apply it with `reconciler apply {out_file}`")
    return o.code


def _explicit_scope(args) -> str | None:
    return getattr(args, "scope", None) or os.environ.get("RECONCILER_SCOPE")


def cmd_show(args) -> int:
    """A saved plan, rendered as `plan` renders a fresh one."""
    plan_file = saved.read(args.file)
    o = Outcome(False, plan_file.plan(), host=plan_file.host)
    show(o, Output(args.output, args.diff, args.quiet, args.verbose))
    return o.code


def _metrics(path: str, outcomes: list[Outcome], by_host: bool = False) -> None:
    from .render.metrics import write_metrics
    try:
        write_metrics(path, outcomes, by_host=by_host)
    except OSError as e:
        print(f"error: cannot write the metrics file {path}: {e.strerror}", file=sys.stderr)


def cmd_watch(cfg: RunConfig) -> int:
    from .watch import watch
    return watch(cfg)


def cmd_export(args, cfg: RunConfig) -> int:
    from .export import export, render_yaml
    result = export(cfg.targets, set(args.kind or KINDS), include_all=args.all, explicit_kinds=bool(args.kind),
                    scope=cfg.options.scope)
    if not args.quiet:
        for n in result.notes:
            print(f"note: {n}", file=sys.stderr)
    if args.output == "json":
        from .render import jsonout
        jsonout.write([d.manifest() for d in result.docs], sys.stdout)  # type: ignore[arg-type]
    else:
        sys.stdout.write(render_yaml(result, include_all=args.all))
        sys.stdout.flush()
    return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    import gc
    # A run builds hundreds of thousands of small, acyclic objects (YAML nodes, specs) that live to
    # the end; the default thresholds rescan them over and over (0.6 s of 1.0 s parsing 3,410
    # documents). Reference counting frees them as always; cycles are still collected, just rarer.
    gc.set_threshold(200_000, 50, 100)
    args = parser().parse_args(argv)
    if args.command in ("plan", "apply", "validate") and not getattr(args, "inventory", None):
        # One pass over one host, then exit: nothing it builds forms cycles worth collecting (ElementTree,
        # marshal and YAML values, frozen dataclasses), so the collector is off. Each collection walked
        # every young object (50-250 ms apiece at 5,000 VMs, 0.23-0.5 s a plan, docs/benchmarks.md).
        # watch, status and the inventory's threads keep it: they run long or hold many hosts at once.
        gc.disable()
    out_format = getattr(args, "output", "text")
    try:
        if args.command == "validate":
            return cmd_validate(args)
        if args.command == "show":
            return cmd_show(args)
        if args.command == "backups":
            from .backups import run_backups
            return run_backups(args.libvirt_uri, args.policy, args.vm, args.output)
        cfg = config(args)
        if args.command == "plan":
            return cmd_plan_apply(cfg, apply=False, args=args)
        if args.command == "apply":
            return cmd_plan_apply(cfg, apply=not args.check, args=args)
        if args.command == "watch":
            return cmd_watch(cfg)
        if args.command == "export":
            return cmd_export(args, cfg)
        if args.command == "status":
            from .render.status_cli import run_status
            return run_status(cfg, args.sample, args.stats_timeout)
    except ReconcilerError as e:
        if args.command in ("plan", "apply") and getattr(args, "metrics_file", None):
            # A run that stopped on bad input or a bad flag still says so in its metrics.
            _metrics(args.metrics_file, [Outcome(args.command == "apply", error=RunError(str(e)))])
        return _error(e, out_format)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
