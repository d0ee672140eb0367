"""What the broker tells a watcher, as calls of `notify(kind, name, what)`: a retained message
published on a managed topic, and a dynamic-security change. Keeps its own MQTT session up: a lost
one is reopened with backoff, subscribed again and followed by `resync()`. Decides nothing.

How a change is learnt (probed on Mosquitto 2.0.11):
- retained messages: a subscription to the managed topics with retain handling 2 (the broker does
  not send what is already retained, only new publishes) and retain-as-published (a retained
  publish arrives with its retain flag, a plain one without: only retained ones are drift).
- dynamic security: the broker publishes the plugin's answers on `$CONTROL/dynamic-security/v1/response`
  to every subscriber allowed to read it, an admin included, whoever sent the command. A response
  names its command (createRole, removeRoleACL, ...) but not the object, so such an event has no
  kind or name: "something in dynamic security changed". Reads (list*, get*) and refused commands
  are not changes.
Idle cost: paho's network thread blocked in select with a 1 s timeout, a PINGREQ every 30 s.
"""
from __future__ import annotations

import json
import re
import ssl
import threading
from typing import Callable, Iterable

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from .connection import RESPONSE_TOPIC, parse_url

Notify = Callable[[str | None, str | None, str], None]

RETRY_FIRST, RETRY_MAX = 0.5, 30.0
CONNECT_WAIT = 10.0
BATCH = 100                  # topic filters per SUBSCRIBE
_COMMAND = re.compile(rb'"command"\s*:\s*"([A-Za-z]+)"')
READ_ONLY = ("list", "get")


class BrokerEvents:
    """Events of one broker, for as long as start() .. stop()."""

    def __init__(self, url: str, username: str | None, password: str | None, cafile: str | None,
                 notify: Notify, resync: Callable[[str], None], say: Callable[[str], None] = lambda s: None):
        self.url = url
        self.scheme, self.host, self.port = parse_url(url)
        self.username, self._password, self.cafile = username, password, cafile
        self.notify, self.resync, self.say = notify, resync, say
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._wanted: set[str] = set()       # managed topics to watch
        self._subscribed: set[str] = set()
        self._dirty = threading.Event()
        self._client: mqtt.Client | None = None
        self._connack = None
        self._lost = False
        self._thread: threading.Thread | None = None
        self.connected = threading.Event()
        self.tried = threading.Event()       # the first connection attempt is over, either way

    def set_topics(self, topics: Iterable[str]) -> None:
        """The managed topics whose retained messages are watched (literal names only)."""
        wanted = {t for t in topics if t and not t.startswith("$") and "+" not in t and "#" not in t}
        with self._lock:
            if wanted != self._wanted:
                self._wanted = wanted
                self._dirty.set()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._supervise, name="mqtt-watch", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=1)

    # ------------------------------------------------------------------ session (own thread)

    def _supervise(self) -> None:
        delay, failures, first = RETRY_FIRST, 0, True
        while not self._stop.is_set():
            why = self._session(first)
            self.tried.set()
            if self._stop.is_set():
                return
            if why is None:           # was connected, then lost
                first, delay, failures = False, RETRY_FIRST, 0
                self.say(f"broker {self.url}: events connection lost; reconnecting with backoff")
            else:
                failures += 1
                if failures == 1:
                    self.say(f"cannot watch broker {self.url}: {why}; retrying with backoff")
            self._stop.wait(delay)
            delay = min(delay * 2, RETRY_MAX)

    def _session(self, first: bool) -> str | None:
        """Connect, subscribe and run until the connection is lost (returns None) or stop();
        a string says why it could not connect at all."""
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="", protocol=mqtt.MQTTv5)
        if self.username is not None:
            c.username_pw_set(self.username, self._password)
        if self.scheme == "mqtts":
            try:
                c.tls_set(ca_certs=self.cafile, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as e:
                return f"cannot use CA file {self.cafile}: {e}"
        c.connect_timeout = CONNECT_WAIT
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_subscribe = self._on_subscribe
        self._pending: dict[int, list[str]] = {}
        self._refused_said = False
        self._connack, self._lost = None, False
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 0
        try:
            c.connect(self.host, self.port, keepalive=30, clean_start=True, properties=props)
        except (OSError, ssl.SSLError) as e:
            return str(getattr(e, "strerror", None) or e)
        self._client = c
        try:
            for _ in range(int(CONNECT_WAIT / 0.2)):
                if self._connack is not None or self._lost or self._stop.is_set():
                    break
                c.loop(timeout=0.2)
            if self._connack is None or self._connack.is_failure:
                return f"the broker did not accept the login ({self._connack or 'no CONNACK'})"
            with self._lock:
                self._subscribed = set()
            self._pending[c.subscribe(RESPONSE_TOPIC, options=SubscribeOptions(qos=0))[1]] = [RESPONSE_TOPIC]
            self._dirty.set()
            if not first:
                self.say(f"broker {self.url}: events connection re-established; running a full pass")
                self.resync(f"broker {self.url} reconnected")
            self.connected.set()
            self.tried.set()
            while not self._stop.is_set() and not self._lost:
                if self._dirty.is_set():
                    self._sync_subscriptions(c)
                if c.loop(timeout=1.0) != mqtt.MQTT_ERR_SUCCESS:
                    break
            return None
        finally:
            self.connected.clear()
            try:
                c.disconnect()
                c.loop(timeout=0.1)
            except Exception:
                pass
            try:
                sock = c.socket()
                if sock is not None:
                    sock.close()
            except Exception:
                pass
            self._client = None

    def _sync_subscriptions(self, c: mqtt.Client) -> None:
        with self._lock:
            self._dirty.clear()
            add = sorted(self._wanted - self._subscribed)
            drop = sorted(self._subscribed - self._wanted)
            self._subscribed = set(self._wanted)
        # Retain handling 2: nothing already retained is sent at subscription; retain as published:
        # a live retained publish keeps its flag.
        opts = SubscribeOptions(qos=0, retainAsPublished=True, retainHandling=SubscribeOptions.RETAIN_DO_NOT_SEND)
        for i in range(0, len(add), BATCH):
            batch = add[i:i + BATCH]
            self._pending[c.subscribe([(t, opts) for t in batch])[1]] = batch
        for i in range(0, len(drop), BATCH):
            c.unsubscribe(drop[i:i + BATCH])

    # ------------------------------------------------------------------ callbacks (own thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties) -> None:
        self._connack = reason_code

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties) -> None:
        topics = self._pending.pop(mid, [])
        refused = [t for t, rc in zip(topics, reason_codes) if rc.is_failure]
        if refused and not self._refused_said:
            self._refused_said = True
            more = f" and {len(refused) - 1} more" if len(refused) > 1 else ""
            self.say(f"broker {self.url} refused the watch's subscription to {refused[0]!r}{more}: changes there "
                     "wait for the interval's round (the login needs subscribe rights, see README.md, MQTT limits)")

    def _on_disconnect(self, client, userdata, flags, reason_code, properties) -> None:
        self._lost = True

    def _on_message(self, client, userdata, msg) -> None:
        try:
            if msg.topic == RESPONSE_TOPIC:
                for command in changes(msg.payload):
                    self.notify(None, None, f"dynamic security: {command}")
            elif msg.retain:
                self.notify("Topic", msg.topic, "retained message cleared" if not msg.payload
                            else "retained message published")
        except Exception:
            pass       # never let a malformed message end the session


def changes(payload: bytes) -> list[str]:
    """The commands in a dynamic-security response message that changed something (not a read,
    not refused). The regex first: a big verbose list answer is not parsed just to be ignored."""
    names = [m.decode() for m in _COMMAND.findall(payload)]
    if not any(not n.startswith(READ_ONLY) for n in names):
        return []
    try:
        responses = json.loads(payload).get("responses", [])
    except (ValueError, AttributeError):
        return []
    out = []
    for r in responses:
        if not isinstance(r, dict):
            continue
        command = str(r.get("command", ""))
        if command and not command.startswith(READ_ONLY) and not r.get("error"):
            out.append(command)
    return out
