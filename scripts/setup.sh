#!/usr/bin/env bash
# Installs what is missing and starts the local services reconciler talks to:
# libvirtd (with virtlogd) and, unless NO_BROKER=1, a Mosquitto broker with dynamic security.
# Idempotent: safe to run again; running services are left alone.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
SUDO=""
[ "$(id -u)" = 0 ] || SUDO="sudo"

PKGS="libvirt-daemon-system libvirt-daemon-driver-qemu libvirt-clients qemu-system-x86 qemu-utils libvirt-dev pkg-config
      mosquitto mosquitto-clients gcc python3-dev python3-venv chromium genisoimage xorriso cpio git gnupg openssh-client"
missing=""
for p in $PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing="$missing $p"
done
if [ -n "$missing" ]; then
  echo "setup: installing$missing"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq $missing >/dev/null
  # Debian starts its own mosquitto.service on 127.0.0.1:1883 where systemd runs; the demo broker
  # (dynamic security, state under .run/) takes that port instead. Only a service this run installed.
  case "$missing" in
    *" mosquitto "*|*" mosquitto") if [ -d /run/systemd/system ]; then
        echo "setup: stopping Debian's own mosquitto.service so the demo broker can use port 1883"
        $SUDO systemctl disable --now mosquitto.service || true
      fi ;;
  esac
fi

# Python environment: a venv in .venv with the package and its test tools.
PY=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PY" -m venv .venv
fi
if ! .venv/bin/python -c "import reconciler, libvirt, paho.mqtt, yaml, jsonschema, pytest" 2>/dev/null \
   || [ pyproject.toml -nt .venv/.installed ]; then
  mkdir -p .run
  if ! { .venv/bin/pip install -q --upgrade pip && .venv/bin/pip install -q -e ".[test]"; } >.run/pip.log 2>&1; then
    cat .run/pip.log >&2
    echo "setup: installing the Python package failed (log above, also in .run/pip.log)" >&2
    exit 1
  fi
  touch .venv/.installed
fi

# What Debian's udev rule would do: without it libvirt re-probes QEMU on every call.
if [ -e /dev/kvm ]; then
  $SUDO chgrp kvm /dev/kvm 2>/dev/null || true
  $SUDO chmod 0660 /dev/kvm 2>/dev/null || true
fi

if ! pgrep -x virtlogd >/dev/null; then $SUDO virtlogd -d; fi
if ! pgrep -x libvirtd >/dev/null; then $SUDO libvirtd -d; fi
for _ in $(seq 1 100); do
  virsh -c qemu:///system version >/dev/null 2>&1 && break
  sleep 0.1
done
virsh -c qemu:///system version >/dev/null

if [ "${NO_BROKER:-0}" != 1 ]; then
  .venv/bin/python scripts/devbroker.py start --dir "$ROOT/.run/broker" --port "${BROKER_PORT:-1883}"
fi
echo "setup: libvirtd and broker are up"
