"""The retained-message sweep's own MQTT reader (reconciler/providers/mosquitto/rawsweep.py) against a
real Mosquitto: it finds exactly what the paho sweep finds (QoS 0, 1 and 2, user properties, other
properties, a topic filter), leaves no session behind, and hands over to paho where it must."""
from __future__ import annotations

import json
import subprocess

import paho.mqtt.client as mqtt
import pytest
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from mqtt_fixtures import mq  # noqa: F401  (a fixture)
from reconciler.providers.mosquitto import rawsweep
from reconciler.providers.mosquitto.connection import Connection


def _publish_retained(m, messages):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set("admin", m.broker.password)
    c.connect("127.0.0.1", m.port)
    c.loop_start()
    try:
        for topic, payload, qos, props in messages:
            p = None
            if props:
                p = Properties(PacketTypes.PUBLISH)
                for k, v in props.items():
                    if k == "user":
                        p.UserProperty = v
                    else:
                        setattr(p, k, v)
            c.publish(topic, payload, qos=qos, retain=True, properties=p).wait_for_publish(10)
    finally:
        c.disconnect()
        c.loop_stop()


def test_the_raw_sweep_finds_what_paho_finds(mq):  # noqa: F811
    msgs = [(f"raw/t{i}", json.dumps({"i": i}), i % 3, None) for i in range(300)]
    msgs += [("raw/props", b"\x00\x01binary", 1, {"user": [("managed-by", "reconciler"), ("k", "v")],
                                                   "ContentType": "application/json", "MessageExpiryInterval": 3600,
                                                   "PayloadFormatIndicator": 0, "ResponseTopic": "raw/r",
                                                   "CorrelationData": b"cid"}),
             ("raw/ünïcode/topic", "ü", 2, {"user": [("ключ", "значение")]})]
    _publish_retained(mq, msgs)
    c = Connection(mq.url, "admin", mq.broker.password)
    c.open()
    try:
        assert c.ids_are_usernames is False
        raw = c.sweep("#")
        assert not c._raw_sweep_failed, "the raw reader handed over to paho"
        by_paho = c._sweep_burst(["#"], 30)
        assert raw == by_paho
        assert {t for t in raw if t.startswith("raw/")} == {t for t, *_ in msgs}
        assert raw["raw/props"].user_properties == (("managed-by", "reconciler"), ("k", "v"))
        assert raw["raw/props"].payload == b"\x00\x01binary" and raw["raw/props"].qos == 1
        assert raw["raw/t2"].qos == 2 and raw["raw/t0"].qos == 0
        one = c.sweep("raw/t7")
        assert list(one) == ["raw/t7"] and one == c._sweep_burst(["raw/t7"], 30)
    finally:
        c.close()
    # Nothing left behind: the sweep's short sessions are gone (dynsec lists no client named after them
    # either way; the broker's own view of connected clients is $SYS, which this broker does not publish).
    out = subprocess.run(["mosquitto_ctrl", "-h", "127.0.0.1", "-p", str(mq.port), "-u", "admin", "-P",
                          mq.broker.password, "dynsec", "listClients"], capture_output=True, text=True, timeout=30)
    assert out.returncode == 0 and "sweep" not in out.stdout


def test_a_refused_subscription_hands_over_to_paho(mq):  # noqa: F811
    mq.ctrl("createRole", "narrow")
    mq.ctrl("addRoleACL", "narrow", "subscribePattern", "allowed/#", "allow", "5")
    mq.ctrl("addRoleACL", "narrow", "publishClientSend", "reconciler/sweep/#", "allow", "5")
    mq.ctrl("addRoleACL", "narrow", "subscribePattern", "$CONTROL/dynamic-security/#", "allow", "5")
    mq.ctrl("createClient", "narrow-user", "-p", "narrow-pw")
    mq.ctrl("addClientRole", "narrow-user", "narrow")
    with pytest.raises(rawsweep.SweepUnsupported):
        rawsweep.sweep("127.0.0.1", mq.port, None, "narrow-user", "narrow-pw", ["#"], "reconciler/sweep/x", 10,
                       lambda *a: a)
    c = Connection(mq.url, "narrow-user", "narrow-pw")
    c.open()
    try:
        from reconciler.errors import TargetError
        with pytest.raises(TargetError, match="may not subscribe"):
            c.sweep("#")
        assert c._raw_sweep_failed
    finally:
        c.close()


def test_a_wrong_password_is_not_a_sweep(mq):  # noqa: F811
    with pytest.raises(rawsweep.SweepUnsupported, match="CONNACK"):
        rawsweep.sweep("127.0.0.1", mq.port, None, "admin", "wrong", ["#"], "reconciler/sweep/x", 10, lambda *a: a)
