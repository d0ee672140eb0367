"""Test helpers: run the CLI as a user would, write manifests, and read libvirt from outside."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from dataclasses import dataclass
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Run:
    code: int
    out: str
    err: str

    @property
    def json(self) -> dict:
        return json.loads(self.out)

    @property
    def recap(self) -> str:
        lines = [l for l in self.out.splitlines() if l.startswith("ok=")]
        return lines[-1] if lines else ""


def cli(*args: str, env: dict | None = None, timeout: float = 300, cwd: str | None = None) -> Run:
    """`python -m reconciler ARGS` in a subprocess, as a user runs it."""
    e = dict(os.environ)
    e.setdefault("RECONCILER_SHUTDOWN_TIMEOUT", "1s")
    # Tests share one libvirtd and may run beside `make demo`: a test's --prune only ever
    # touches its own scope (tests that prune pass --scope PREFIX).
    e.setdefault("RECONCILER_SCOPE", "tests")
    if env:
        e.update(env)
    p = subprocess.run([sys.executable, "-m", "reconciler", *args], capture_output=True, text=True,
                       env=e, timeout=timeout, cwd=cwd or str(ROOT))
    return Run(p.returncode, p.stdout, p.stderr)


def write(path: Path, *docs: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump_all(docs, sort_keys=False))
    return path


def doc(kind: str, name: str, spec: dict, labels: dict | None = None) -> dict:
    meta = {"name": name}
    if labels:
        meta["labels"] = labels
    return {"apiVersion": "reconciler/v1", "kind": kind, "metadata": meta, "spec": spec}


def unique(prefix: str = "t") -> str:
    return f"{prefix}{uuid.uuid4().hex[:8]}"


def virsh(uri: str, *args: str, check: bool = True) -> str:
    p = subprocess.run(["virsh", "-q", "-c", uri, *args], capture_output=True, text=True, timeout=120)
    if check and p.returncode != 0:
        raise AssertionError(f"virsh {' '.join(args)} failed: {p.stderr}")
    return p.stdout
