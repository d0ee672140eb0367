"""The `status` command at the edge: its arguments, one status reading, the chosen rendering on stdout,
the metrics file, the exit code (0, or 1 when part of the reading failed). cli.py only hooks it in."""
from __future__ import annotations

import argparse
import shutil
import sys


def _seconds(text: str) -> float:
    t = text.strip()
    scale = 1.0
    for unit, f in (("ms", 0.001), ("s", 1.0)):
        if t.endswith(unit):
            t, scale = t[: -len(unit)], f
            break
    try:
        value = float(t) * scale
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration (use 1s, 500ms, 0)") from None
    if value < 0 or value > 60:
        raise argparse.ArgumentTypeError(f"{text!r} is out of range (0 to 60 s)")
    return value


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The flags only `status` has (targets, scope and output flags are cli.py's shared ones)."""
    p.add_argument("--sample", type=_seconds, default=1.0, metavar="DURATION",
                   help="time between the two CPU samples (default 1s; 0: no CPU %%)")
    p.add_argument("--stats-timeout", type=_seconds, default=10.0, metavar="DURATION",
                   help="how long the statistics call may take before VMs are asked one by one (default 10s)")


def run_status(args, cfg, stdout=None) -> int:
    """`cfg` is the command line's RunConfig: its targets, options (scope) and output."""
    from ..status import status, to_dict
    stdout = stdout or sys.stdout
    out = cfg.output
    report = status(list(cfg.paths), cfg.targets, cfg.options, sample_seconds=args.sample,
                    stats_timeout=args.stats_timeout)
    if out.verbose:
        print("status: " + ", ".join(f"{k} {v:.3f}s" for k, v in report.timings.items()), file=sys.stderr)
    if out.metrics_file:
        from .status_metrics import write
        try:
            write(out.metrics_file, report)
        except OSError as e:
            from ..errors import ReconcilerError
            raise ReconcilerError(f"cannot write the metrics file {out.metrics_file}: {e.strerror}") from None
    if out.format == "json":
        import json
        # Compact: the C encoder; indenting falls back to the pure-Python one (0.5 s at 1,000 VMs). Use jq to read.
        stdout.write(json.dumps(to_dict(report), separators=(",", ":")) + "\n")
    elif out.format == "html":
        from .status_html import render
        stdout.write(render(report))
    elif not out.quiet or report.errors:
        from .status_text import render
        stdout.write(render(report, width=shutil.get_terminal_size((100, 24)).columns))
    stdout.flush()
    for e in report.errors:
        print(f"error: {e}", file=sys.stderr)
    return 1 if report.errors else 0
