"""What a run is asked to do, as values the command line builds once: the targets to talk to,
the output wanted, and the run configuration. Below the command line nothing sees argparse."""
from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Mapping

from .errors import ReconcilerError
from .model import Options


@dataclass(frozen=True)
class Targets:
    libvirt_uri: str = "qemu:///system"
    mqtt_url: str = "mqtt://127.0.0.1:1883"
    mqtt_username: str | None = None
    mqtt_password: str | None = field(default=None, repr=False)
    mqtt_cafile: str | None = None


@dataclass(frozen=True)
class Output:
    """How outcomes are shown; used only by the renderers at the edge."""
    format: str = "text"          # text | json (| html for status)
    diff: bool = False
    quiet: bool = False
    verbose: bool = False
    metrics_file: str | None = None


@dataclass(frozen=True)
class RunConfig:
    paths: tuple[str, ...] = ()
    targets: Targets = Targets()
    options: Options = Options()
    output: Output = Output()
    lock_timeout: float = 300.0
    inventory: str | None = None
    forks: int = 10
    limit: str | None = None
    interval: float = 60.0


def broker_password(environ: Mapping[str, str] = os.environ) -> str | None:
    """The broker admin password: RECONCILER_MQTT_PASSWORD, else the file RECONCILER_MQTT_PASSWORD_FILE
    names. The one place it is resolved; inventory hosts without their own fall back to it."""
    password = environ.get("RECONCILER_MQTT_PASSWORD")
    pw_file = environ.get("RECONCILER_MQTT_PASSWORD_FILE")
    if password is None and pw_file:
        try:
            with open(pw_file, encoding="utf-8") as f:
                password = f.read().strip()
        except OSError as e:
            raise ReconcilerError(f"cannot read RECONCILER_MQTT_PASSWORD_FILE {pw_file}: {e.strerror}") from None
    return password
