"""The command line's own contract: usage errors exit 1 (2 means "changes pending" to plan's users),
in one line on stderr, never a traceback; --help imports nothing heavy."""
from __future__ import annotations

import pytest

from helpers import cli


@pytest.mark.parametrize("args, env", [
    (("plan", "manifests", "--bogus"), {}),
    ((), {}),
    (("frobnicate",), {}),
    (("apply", "manifests", "--lock-timeout", "soon"), {}),
    (("apply", "manifests"), {"RECONCILER_LOCK_TIMEOUT": "abc"}),
    (("plan", "manifests"), {"RECONCILER_SCOPE": "two words"}),
    (("apply", "manifests", "-o", "yaml"), {}),
], ids=["unknown-flag", "no-command", "unknown-command", "bad-duration", "bad-duration-env", "bad-scope-env", "bad-output"])
def test_usage_errors_exit_1_in_one_line(args, env):
    run = cli(*args, env=env)
    assert run.code == 1, (run.code, run.err)
    lines = run.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    assert "Traceback" not in run.err and run.out == ""


def test_help_exits_0_and_names_every_command():
    run = cli("--help")
    assert run.code == 0
    for command in ("validate", "plan", "apply", "watch", "export"):
        assert command in run.out
