"""Fixtures and helpers of the MQTT tests: a real Mosquitto 2 per test (free loopback port, own temp
dir, stopped afterwards), the CLI run against it with every output kept for the secret scan, real paho
clients that prove what the broker enforces, and mosquitto_ctrl / mosquitto_pub for hand-made drift."""
from __future__ import annotations

import json
import subprocess
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from helpers import Run, cli, doc, write
import devbroker


def start_broker(d: Path, **kw) -> devbroker.Broker:
    last = None
    for _ in range(5):           # a free port can be taken between the probe and the bind
        try:
            return devbroker.start(d, devbroker.free_port(), die_with_parent=True, **kw)
        except devbroker.DevBrokerError as e:
            last = e
            devbroker.stop(d)
    raise last


@dataclass
class Mqtt:
    """One broker and everything a test did with it."""
    broker: devbroker.Broker
    tmp: Path
    secrets: list = field(default_factory=list)
    outputs: list = field(default_factory=list)

    @property
    def url(self) -> str:
        return self.broker.url

    @property
    def port(self) -> int:
        return self.broker.port

    def env(self, **extra) -> dict:
        e = {"RECONCILER_MQTT_URL": self.url, "RECONCILER_MQTT_USERNAME": "admin",
             "RECONCILER_MQTT_PASSWORD": self.broker.password}
        e.update(extra)
        return e

    def secret(self, value: str) -> str:
        """Remember a secret the test uses: no output may ever contain it."""
        self.secrets.append(value)
        return value

    def run(self, *args: str, env: dict | None = None, timeout: float = 120) -> Run:
        r = cli(*args, env=self.env(**(env or {})), timeout=timeout)
        self.outputs.append(f"$ reconciler {' '.join(args)}\n{r.out}\n{r.err}")
        return r

    def apply_twice(self, path, *extra, env: dict | None = None) -> Run:
        first = self.run("apply", str(path), *extra, env=env)
        assert first.code == 0, first.out + first.err
        second = self.run("apply", str(path), *extra, env=env)
        assert second.code == 0, second.out + second.err
        assert "changed=0" in second.recap and "failed=0" in second.recap, second.out
        plan = self.run("plan", str(path), *extra, "-o", "json", env=env)
        assert plan.code == 0, plan.out + plan.err
        assert plan.json["changes"] == []
        return first

    def ctrl(self, *args: str) -> str:
        p = subprocess.run(["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(self.port), "-u", "admin",
                            "-P", self.broker.password, "dynsec", *args], capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stdout + p.stderr
        return p.stdout

    def pub(self, topic: str, payload: str, *, retain: bool = True) -> None:
        """A retained message set by hand, as a device would (no reconciler marker)."""
        args = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(self.port), "-u", "admin", "-P",
                self.broker.password, "-V", "mqttv5", "-q", "1", "-t", topic, "-m", payload]
        if retain:
            args.append("-r")
        p = subprocess.run(args, capture_output=True, text=True, timeout=30)
        assert p.returncode == 0, p.stderr

    def dynsec_file(self) -> dict:
        return json.loads((self.broker.dir / "dynamic-security.json").read_text())

    def assert_no_secret_leaked(self) -> None:
        everything = "\n".join(self.outputs)
        log = self.broker.dir / "mosquitto.log"
        if log.exists():
            everything += log.read_text(errors="replace")
        for s in self.secrets + [self.broker.password]:
            assert s not in everything, "a secret appeared in the output"


@pytest.fixture
def mq(tmp_path):
    b = start_broker(tmp_path / "broker")
    m = Mqtt(b, tmp_path)
    try:
        yield m
        m.assert_no_secret_leaked()
    finally:
        b.stop()


# --------------------------------------------------------------------------- real clients

class Client:
    """A paho MQTT v5 client as a device or a dashboard would use it."""

    def __init__(self, port: int, username: str, password: str, client_id: str | None = None):
        self.cond = threading.Condition()
        self.connack = None
        self.acks: dict = {}
        self.subacks: dict = {}
        self.messages: list = []
        self.c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id or f"t-{username}-{time.monotonic_ns()}",
                             protocol=mqtt.MQTTv5)
        self.c.username_pw_set(username, password)
        self.c.on_connect = self._on_connect
        self.c.on_publish = lambda c, u, mid, rc, p: self._put(self.acks, mid, rc)
        self.c.on_subscribe = lambda c, u, mid, rcs, p: self._put(self.subacks, mid, rcs)
        self.c.on_message = self._on_message
        self.c.connect("127.0.0.1", port, keepalive=30)
        self.c.loop_start()
        self._wait(lambda: self.connack)

    def _on_connect(self, c, u, flags, rc, props):
        with self.cond:
            self.connack = rc
            self.cond.notify_all()

    def _on_message(self, c, u, msg):
        with self.cond:
            self.messages.append(msg)
            self.cond.notify_all()

    def _put(self, d, k, v):
        with self.cond:
            d[k] = v
            self.cond.notify_all()

    def _wait(self, ready, timeout=10.0):
        end = time.monotonic() + timeout
        with self.cond:
            while (v := ready()) is None:
                left = end - time.monotonic()
                if left <= 0:
                    return None
                self.cond.wait(left)
            return v

    @property
    def connected(self) -> bool:
        return self.connack is not None and not self.connack.is_failure

    def publish(self, topic: str, payload: str, retain=False) -> int:
        info = self.c.publish(topic, payload, qos=1, retain=retain)
        rc = self._wait(lambda: self.acks.get(info.mid))
        assert rc is not None, "no PUBACK"
        return int(rc.value)

    def subscribe(self, topic: str) -> int:
        rc, mid = self.c.subscribe(topic, qos=1)
        rcs = self._wait(lambda: self.subacks.get(mid))
        assert rcs is not None, "no SUBACK"
        return int(rcs[0].value)

    def received(self, topic: str, timeout=3.0):
        return self._wait(lambda: next((m for m in self.messages if m.topic == topic), None), timeout)

    def close(self):
        try:
            self.c.disconnect()
        finally:
            self.c.loop_stop()


def login(port: int, username: str, password: str) -> Client:
    return Client(port, username, password)


def edge_manifests(sensor_pw: str, reader_pw_env: str = "READER_PW", *, sensor_groups=True) -> list[dict]:
    """The classic edge/device/data set-up."""
    return [
        doc("MqttRole", "sensors", {"description": "sensor firmware",
                                   "acls": [{"type": "publishClientSend", "topic": "edge/+/data"}]},
            labels={"site": "plant-3"}),
        doc("MqttRole", "readers", {"acls": [{"type": "subscribePattern", "topic": "edge/+/data"}]}),
        doc("MqttGroup", "field-devices", {"roles": [{"name": "sensors", "priority": 0}]}),
        doc("MqttClient", "sensor-01", {"password": {"fromFile": sensor_pw},
                                        "groups": [{"name": "field-devices"}] if sensor_groups else []}),
        doc("MqttClient", "dashboard", {"password": {"fromEnv": reader_pw_env}, "roles": [{"name": "readers"}]}),
        doc("Topic", "edge/gw-1/config", {"retained": {"json": {"interval": 30}},
                                          "publishers": ["sensors"], "subscribers": ["readers"]}),
    ]


def write_edge(m: Mqtt, sensor_password: str = "sensor-pass-1", **kw) -> Path:
    pw = m.tmp / "secrets" / "sensor-01"
    pw.parent.mkdir(exist_ok=True)
    pw.write_text(m.secret(sensor_password) + "\n")
    return write(m.tmp / "m" / "edge.yaml", *edge_manifests(str(pw), **kw))
