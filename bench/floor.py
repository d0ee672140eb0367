"""The API floor: a bare Python process that makes only the calls any correct reconciler must make,
and nothing else (no manifests, no schemas, no planning, no output). `bench.py` times it as a whole
process, exactly as it times `reconciler`, so the ratio between the two is reconciler's own overhead.

    python bench/floor.py read   --libvirt-uri URI [--mqtt-url URL --mqtt-username U]   (password: env)
    python bench/floor.py define --libvirt-uri URI XMLDIR

`read`:   libvirt - list the pools; per pool its XML, then list its volumes and read each volume's XML;
          list the domains and read each domain's XML. One thread, one connection.
          MQTT    - one dynamic-security request carrying the three verbose lists (clients, groups,
          roles), then one retained-message sweep: subscribe to `#`, publish a sentinel, wait for it.
`define`: defineXML + create() for every *.xml in XMLDIR, in name order: the loop a hand-written
          script would run to create and start the same VMs.
"""
from __future__ import annotations

import json
import os
import sys
import threading
import uuid


def read_libvirt(uri: str) -> int:
    import libvirt
    libvirt.registerErrorHandler(lambda *a: None, None)
    conn = libvirt.open(uri)
    n = 0
    for pool in conn.listAllStoragePools(0):
        pool.XMLDesc(0)
        if pool.isActive():
            for vol in pool.listAllVolumes(0):
                vol.XMLDesc(0)
                n += 1
    for dom in conn.listAllDomains(0):
        dom.XMLDesc(0)
        n += 1
    conn.close()
    return n


def read_mqtt(url: str, username: str, password: str) -> int:
    import paho.mqtt.client as mqtt
    from paho.mqtt.subscribeoptions import SubscribeOptions
    host, port = url.split("://", 1)[1].rsplit(":", 1)
    cond = threading.Condition()
    state: dict = {"connected": False, "responses": None, "sentinel": False, "retained": 0, "suback": set()}
    sentinel_topic = f"floor/sweep/{uuid.uuid4().hex}"
    sentinel = uuid.uuid4().hex.encode()

    def on_connect(c, u, flags, rc, props):
        with cond:
            state["connected"] = True
            cond.notify_all()

    def on_subscribe(c, u, mid, rcs, props):
        with cond:
            state["suback"].add(mid)
            cond.notify_all()

    def on_message(c, u, msg):
        with cond:
            if msg.topic == "$CONTROL/dynamic-security/v1/response":
                state["responses"] = json.loads(msg.payload)["responses"]
            elif msg.topic == sentinel_topic:
                if msg.payload == sentinel:
                    state["sentinel"] = True
            elif msg.retain:
                state["retained"] += 1
            cond.notify_all()

    def wait(pred):
        with cond:
            if not cond.wait_for(pred, 30):
                raise SystemExit("floor: the broker did not answer within 30 s")

    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv5)
    c.username_pw_set(username, password)
    c.on_connect, c.on_subscribe, c.on_message = on_connect, on_subscribe, on_message
    c.connect(host, int(port))
    c.loop_start()
    wait(lambda: state["connected"])
    _, mid = c.subscribe("$CONTROL/dynamic-security/v1/response", qos=1)
    wait(lambda: mid in state["suback"])
    cmds = [{"command": cmd, "verbose": True, "count": -1, "offset": 0}
            for cmd in ("listClients", "listGroups", "listRoles")]
    c.publish("$CONTROL/dynamic-security/v1", json.dumps({"commands": cmds}), qos=1)
    wait(lambda: state["responses"] is not None)
    _, mid = c.subscribe("#", options=SubscribeOptions(qos=2, retainAsPublished=True))
    wait(lambda: mid in state["suback"])
    c.publish(sentinel_topic, sentinel, qos=1)
    wait(lambda: state["sentinel"])
    n = state["retained"] + sum(len((r.get("data") or {}).get(k, [])) for r in state["responses"]
                                for k in ("clients", "groups", "roles"))
    c.disconnect()
    c.loop_stop()
    return n


def define(uri: str, xmldir: str) -> int:
    import libvirt
    conn = libvirt.open(uri)
    n = 0
    for name in sorted(os.listdir(xmldir)):
        if name.endswith(".xml"):
            with open(os.path.join(xmldir, name), encoding="utf-8") as f:
                dom = conn.defineXML(f.read())
            dom.create()
            n += 1
    conn.close()
    return n


def main(argv: list[str]) -> int:
    import argparse
    ap = argparse.ArgumentParser(prog="floor")
    ap.add_argument("mode", choices=("read", "define"))
    ap.add_argument("xmldir", nargs="?")
    ap.add_argument("--libvirt-uri", required=True)
    ap.add_argument("--mqtt-url")
    ap.add_argument("--mqtt-username", default="admin")
    a = ap.parse_args(argv)
    if a.mode == "define":
        n = define(a.libvirt_uri, a.xmldir)
    else:
        n = read_libvirt(a.libvirt_uri)
        if a.mqtt_url:
            n += read_mqtt(a.mqtt_url, a.mqtt_username, os.environ["RECONCILER_MQTT_PASSWORD"])
    print(f"floor {a.mode}: {n} objects")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
