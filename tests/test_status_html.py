"""`reconciler status -o html` in a real browser: headless Chromium (Debian's `chromium`) loads the page
from a file, renders it to a PNG and dumps the DOM it built. The page must hold no script and no
reference to anything outside itself, load with no console message, and show each VM's name, state
and drifted fields. Set RECONCILER_STATUS_SCREENSHOT=docs/status.png to keep the picture."""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from helpers import ROOT, cli, virsh, write
from mqtt_fixtures import mq  # noqa: F401  (a fixture)
from test_status import apply_twice, isolated_net, site  # noqa: F401  (isolated_net is a fixture)

pytestmark = [pytest.mark.libvirt]

CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
                  "--disable-component-update", "--disable-sync", "--no-first-run", "--hide-scrollbars",
                  "--enable-logging=stderr", "--v=0", "--log-level=0"]


def chromium() -> str:
    found = shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        pytest.fail("chromium is not installed (scripts/setup.sh installs Debian's chromium package)")
    return found


def browse(page: Path, *args: str) -> subprocess.CompletedProcess:
    with tempfile.TemporaryDirectory(prefix="reconciler-chromium-") as profile:
        return subprocess.run([chromium(), *CHROMIUM_FLAGS, f"--user-data-dir={profile}", *args, page.as_uri()],
                              capture_output=True, text=True, timeout=120)


def console_messages(stderr: str) -> list[str]:
    """What the page logged: uncaught errors, console.*, failed loads are all CONSOLE lines."""
    return [l for l in stderr.splitlines() if ":CONSOLE" in l or "ERR_FILE_NOT_FOUND" in l
            or "Failed to load resource" in l]


def test_html_page_renders_in_chromium(qemu_uri, prefix, pool_dir, tmp_path, mq, isolated_net):  # noqa: F811
    m = write(tmp_path / "site" / "site.yaml",
              *site(prefix, pool_dir, vms=("gw-1", "gw-2"), topic=True, network=isolated_net))
    env = {**mq.env(), "RECONCILER_LIBVIRT_URI": qemu_uri, "RECONCILER_SCOPE": prefix.rstrip("-")}
    apply_twice(m, env)
    drifted, fine = f"{prefix}gw-1", f"{prefix}gw-2"
    virsh(qemu_uri, "desc", drifted, "--live", "--config", "edited by hand <b>&</b>")

    run = cli("status", str(m), "-o", "html", env=env, timeout=180)
    assert run.code == 0, run.err
    html = run.out
    mq.outputs.append(html)
    page = tmp_path / "status.html"
    page.write_text(html)

    # Self-contained: no script, no stylesheet link, no image or URL to fetch.
    assert html.startswith("<!DOCTYPE html>") and "<style>" in html
    assert not re.search(r"<script|<link|<img|<iframe|\bsrc=|\bhref=|url\(|@import", html, re.I)
    assert "edited by hand" not in html           # a description is never shown, and nothing unescaped
    assert "<b>&</b>" not in html

    shot = tmp_path / "status.png"
    r = browse(page, "--window-size=1280,1500", f"--screenshot={shot}")
    assert r.returncode == 0, r.stderr[-2000:]
    assert console_messages(r.stderr) == [], console_messages(r.stderr)
    png = shot.read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    # A blank or unstyled page compresses to a few KB; cards, bars and badges do not.
    assert len(png) > 30_000, len(png)

    r = browse(page, "--dump-dom")
    assert r.returncode == 0, r.stderr[-2000:]
    assert console_messages(r.stderr) == [], console_messages(r.stderr)
    dom = r.stdout
    text = re.sub(r"<[^>]+>", " ", dom)
    for name in (drifted, fine):
        assert name in text
    assert "spec.description" in text and "drifted" in text and "in sync" in text
    assert f"status/{prefix}gw/config" in text and "present" in text
    assert "clients connected" in text and "retained messages" in text
    # Each of our VMs has its card with CPU, memory and disk bars filled to its figures.
    for name in (drifted, fine):
        [card] = [c for c in dom.split('<div class="card"') if c.startswith(f' id="vm-{name}"')]
        for bar in ("cpu", "mem", "disk"):
            assert re.search(rf'class="bar {bar}"[^>]*><span style="width:\d', card), (name, bar)
        assert ("spec.description" in card) == (name == drifted)

    keep = os.environ.get("RECONCILER_STATUS_SCREENSHOT")
    if keep:
        target = Path(keep) if os.path.isabs(keep) else ROOT / keep
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(shot, target)
