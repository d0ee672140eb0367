"""One Outcome on the terminal: text or JSON on stdout, the error sentence on stderr."""
from __future__ import annotations

import sys
from typing import IO

from ..config import Output
from ..outcome import Outcome


def show(o: Outcome, out: Output, text=None, stdout: IO | None = None) -> None:
    """`text` is the TextRenderer that streamed the results, if any (it prints the rest)."""
    from . import jsonout
    from .text import TextRenderer
    stdout = stdout or sys.stdout
    if out.format == "json":
        jsonout.write(jsonout.outcome_json(o), stdout)
        if o.error is not None:
            print(f"error: {o.error.message}", file=sys.stderr, flush=True)
        return
    text = text or TextRenderer(stdout, out)
    text.finish(o)
    text.error(o)
