"""The `status` command at the edge: one status reading, the chosen rendering on stdout,
the metrics file, the exit code (0, or 1 when part of the reading failed). cli.py only hooks it in."""
from __future__ import annotations

import shutil
import sys


def run_status(cfg, sample: float = 1.0, stats_timeout: float = 10.0, stdout=None) -> int:
    """`cfg` is the command line's RunConfig: its paths, targets, options (scope) and output."""
    from ..status import status, to_dict
    stdout = stdout or sys.stdout
    out = cfg.output
    report = status(list(cfg.paths), cfg.targets, cfg.options, sample_seconds=sample,
                    stats_timeout=stats_timeout)
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
