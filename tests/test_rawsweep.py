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

from helpers import doc, write
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
        raw = c.read_retained("#")
        assert not c._raw_sweep_failed, "the raw reader handed over to paho"
        by_paho = c.sweep("#")
        assert raw == by_paho
        assert {t for t in raw if t.startswith("raw/")} == {t for t, *_ in msgs}
        assert raw["raw/props"].user_properties == (("managed-by", "reconciler"), ("k", "v"))
        assert raw["raw/props"].payload == b"\x00\x01binary" and raw["raw/props"].qos == 1
        assert raw["raw/t2"].qos == 2 and raw["raw/t0"].qos == 0
        one = c.read_retained("raw/t7")
        assert list(one) == ["raw/t7"] and one == c.sweep("raw/t7")
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
            c.read_retained("#")
        assert c._raw_sweep_failed
    finally:
        c.close()


def test_a_wrong_password_is_not_a_sweep(mq):  # noqa: F811
    with pytest.raises(rawsweep.SweepUnsupported, match="CONNACK"):
        rawsweep.sweep("127.0.0.1", mq.port, None, "admin", "wrong", ["#"], "reconciler/sweep/x", 10, lambda *a: a)


def test_topics_applied_twice_through_the_raw_sweep(mq, tmp_path):  # noqa: F811
    """The CLI's reads use the raw sweep: 300 Topics applied twice (the second changes nothing), then a
    message overwritten by hand is drift, and applying again restores it."""
    docs = [doc("Topic", f"raw/cli/{i}", {"retained": {"json": {"i": i}, "qos": i % 3}}) for i in range(300)]
    m = write(tmp_path / "topics.yaml", *docs)
    mq.apply_twice(m)
    mq.pub("raw/cli/7", '{"i": "by hand"}')
    plan = mq.run("plan", str(m), "-o", "json")
    assert plan.code == 2, plan.out + plan.err
    assert [c["name"] for c in plan.json["changes"]] == ["raw/cli/7"]
    mq.apply_twice(m)
