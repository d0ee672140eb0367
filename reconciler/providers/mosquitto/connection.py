"""One MQTT v5 session with the broker (the only module that imports paho): connect within a deadline,
dynamic-security requests matched to responses by correlationData, acknowledged QoS 1 publishes with
their reason codes, and the retained-message sweep (subscribe, then a sentinel round trip proves the
retained burst is complete: no fixed sleeps). Besides the session: throwaway logins that test whether
the broker accepts a client's password (probe_logins), on their own short connections.

Its own network thread runs paho's loop and never reconnects: a connection that goes away fails
every waiting call with TargetError instead of silently resuming without its subscriptions.
"""
from __future__ import annotations

import json
import socket
import ssl
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from urllib.parse import urlsplit

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties
from paho.mqtt.subscribeoptions import SubscribeOptions

from ...errors import TargetError
from . import rawsweep
from .rawsweep import connect_packet

CONTROL_TOPIC = "$CONTROL/dynamic-security/v1"
RESPONSE_TOPIC = CONTROL_TOPIC + "/response"
SENTINEL_PREFIX = "reconciler/sweep/"
CONNECT_TIMEOUT = 20.0      # TCP + TLS + CONNACK; the whole failure is reported within 30 s
REQUEST_TIMEOUT = 15.0
# Topics asked for by name per SUBSCRIBE: each burst stays far below Mosquitto's default
# max_queued_messages (1000), which is what drops messages from one big `#` burst.
SWEEP_BATCH = 100
PROBE_WORKERS = 4
PROBE_TIMEOUT = 10.0
RC_CLIENT_ID_NOT_VALID = 0x85


@dataclass(frozen=True)
class RetainedMessage:
    topic: str
    payload: bytes
    qos: int
    user_properties: tuple


class PublishRefused(Exception):
    """The broker answered a publish with a failure reason code."""

    def __init__(self, reason: str, code: int):
        super().__init__(reason)
        self.reason, self.code = reason, code


def parse_url(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of mqtt://host[:1883] or mqtts://host[:8883]."""
    parts = urlsplit(url)
    if parts.scheme not in ("mqtt", "mqtts") or not parts.hostname:
        raise TargetError(f"broker URL {url!r} is not mqtt://host:port or mqtts://host:port")
    try:
        port = parts.port or (8883 if parts.scheme == "mqtts" else 1883)
    except ValueError:
        raise TargetError(f"broker URL {url!r} has an invalid port") from None
    return parts.scheme, parts.hostname, port


class Connection:
    def __init__(self, url: str, username: str | None, password: str | None, cafile: str | None = None,
                 *, request_timeout: float = REQUEST_TIMEOUT):
        self.url = url
        self.scheme, self.host, self.port = parse_url(url)
        self.username = username
        self._password = password
        self.cafile = cafile
        self.request_timeout = request_timeout
        # Empty: the broker assigns one and says which (MQTT v5), which tells whether it uses the user
        # name as client id (use_username_as_clientid), see open().
        self.client_id = ""
        # True when the broker's listener makes every login's client id its user name: a login as a
        # device's user would then take over the device's session. None: not known.
        self.ids_are_usernames: bool | None = None
        self._tls_session = None
        self._probe_ctx: ssl.SSLContext | None = None
        self._raw_sweep_failed = False      # rawsweep.py could not sweep here once: paho from then on
        # Names this session's sentinel topic and correlation data, whatever client id it gets.
        self._token = f"reconciler-{uuid.uuid4().hex[:12]}"
        self._cond = threading.Condition()
        self._connack: mqtt.ReasonCode | None = None
        self._lost: str | None = None
        self._responses: dict[str, dict] = {}
        self._acks: dict[int, tuple] = {}
        self._awaited: set[int] = set()
        self._subacks: dict[int, list] = {}
        self._sweep: dict[str, RetainedMessage] | None = None
        self._sweep_topics: set[str] | None = None   # None: every topic
        self._sentinel: str | None = None
        self._sentinel_seen = False
        self._seq = 0
        self._stop = threading.Event()
        self._closing = False
        self._thread: threading.Thread | None = None
        self._client: mqtt.Client | None = None

    # ------------------------------------------------------------------ connect / close

    def open(self) -> None:
        try:
            self._open("")
        except _ClientIdRefused:
            # A broker that does not assign client ids (allow_zero_length_clientid false): our own id,
            # and whether it ties client ids to user names stays unknown.
            self.__init__(self.url, self.username, self._password, self.cafile, request_timeout=self.request_timeout)
            self._open(f"reconciler-{uuid.uuid4().hex[:12]}")

    def _open(self, client_id: str) -> None:
        deadline = time.monotonic() + CONNECT_TIMEOUT
        self.client_id = client_id
        c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
        if self.username is not None:
            c.username_pw_set(self.username, self._password)
        if self.scheme == "mqtts":
            try:
                c.tls_set(ca_certs=self.cafile, cert_reqs=ssl.CERT_REQUIRED)
            except (OSError, ssl.SSLError) as e:
                raise TargetError(f"cannot use CA file {self.cafile}: {getattr(e, 'strerror', None) or e}") from None
        c.connect_timeout = 10.0
        c.on_connect = self._on_connect
        c.on_disconnect = self._on_disconnect
        c.on_message = self._on_message
        c.on_publish = self._on_publish
        c.on_subscribe = self._on_subscribe
        c.on_unsubscribe = self._on_subscribe
        # Every write goes through our network thread: without this paho writes a packet from the
        # calling thread while ours reads, and an SSL socket does not survive that (mqtts://).
        c.on_socket_register_write = lambda client, userdata, sock: None
        props = Properties(PacketTypes.CONNECT)
        props.ReceiveMaximum = 65535
        props.SessionExpiryInterval = 0
        self._client = c
        try:
            c.connect(self.host, self.port, keepalive=30, clean_start=True, properties=props)
        except ssl.SSLError as e:
            raise TargetError(f"TLS handshake with broker {self.url} failed: {e.reason or e}") from None
        except socket.gaierror as e:
            raise TargetError(f"cannot resolve broker host {self.host!r}: {e.strerror}") from None
        except (socket.timeout, TimeoutError):
            raise TargetError(f"broker {self.url} did not answer within {c.connect_timeout:.0f} s") from None
        except OSError as e:
            raise TargetError(f"cannot reach broker {self.url}: {e.strerror or e}") from None
        try:
            # paho leaves Nagle on: a small packet written while the last one waits for its (delayed)
            # ACK would wait 40 ms; every exchange here is a small request and its answer.
            c.socket().setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except (OSError, AttributeError):
            pass
        self._thread = threading.Thread(target=self._run, name="mqtt-reconciler", daemon=True)
        self._thread.start()
        with self._cond:
            while self._connack is None and self._lost is None:
                left = deadline - time.monotonic()
                if left <= 0:
                    break
                self._cond.wait(left)
        if self._connack is None:
            why = self._lost or f"no CONNACK within {CONNECT_TIMEOUT:.0f} s"
            self.close()
            raise TargetError(f"broker {self.url} did not accept the connection: {why}")
        if self._connack.is_failure:
            rc = self._connack
            self.close()
            if client_id == "" and rc.value == RC_CLIENT_ID_NOT_VALID:
                raise _ClientIdRefused()
            if not self.username:
                raise TargetError(f"broker {self.url} refused an anonymous login ({rc}); give the admin login with "
                                  f"--mqtt-username or RECONCILER_MQTT_USERNAME and RECONCILER_MQTT_PASSWORD(_FILE)")
            raise TargetError(f"broker {self.url} refused the login of user {self.username!r}: {rc}")
        codes = self.subscribe(RESPONSE_TOPIC, qos=1)
        if codes[0] >= 128:
            self.close()
            raise TargetError(f"user {self.username!r} may not subscribe to {RESPONSE_TOPIC} on {self.url}: "
                              "the login needs dynamic-security admin rights")

    def close(self) -> None:
        c = self._client
        self._closing = True
        if c is not None:
            try:
                c.disconnect()      # written by the network thread, which then ends its loop
            except Exception:
                pass
        mine = self._thread is not None and self._thread is not threading.current_thread()
        if mine:
            self._thread.join(timeout=2)
        self._stop.set()
        if mine:
            self._thread.join(timeout=5)
        if c is not None:
            try:
                c.socket() and c.socket().close()
            except Exception:
                pass
        with self._cond:
            self._lost = self._lost or "connection closed"
            self._cond.notify_all()

    def _run(self) -> None:
        c = self._client
        quickack = getattr(socket, "TCP_QUICKACK", None)
        while not self._stop.is_set():
            # Mosquitto leaves Nagle on (set_tcp_nodelay false): when it writes two packets in a row
            # (a PUBACK, then the dynsec response), the second waits for our ACK of the first, which
            # Linux delays by 40 ms. Acknowledging at once makes a dynsec request take about 1 ms,
            # not 40-50 (the kernel drops back to delayed ACKs by itself, so it is set each round).
            sock = c.socket()
            if quickack is not None and sock is not None:
                try:
                    sock.setsockopt(socket.IPPROTO_TCP, quickack, 1)
                except OSError:
                    pass
            rc = c.loop(timeout=0.2)
            if rc != mqtt.MQTT_ERR_SUCCESS:
                if not self._stop.is_set() and not self._closing:
                    with self._cond:
                        self._lost = self._lost or f"connection lost ({mqtt.error_string(rc)})"
                        self._cond.notify_all()
                return

    # ------------------------------------------------------------------ callbacks (network thread)

    def _on_connect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            assigned = getattr(properties, "AssignedClientIdentifier", None) if properties is not None else None
            if self.client_id == "" and assigned:
                self.client_id = assigned
                self.ids_are_usernames = self.username is not None and assigned == self.username
            self._connack = reason_code
            self._cond.notify_all()

    def _on_disconnect(self, client, userdata, flags, reason_code, properties):
        with self._cond:
            if not self._stop.is_set() and not self._closing:
                self._lost = self._lost or f"the broker closed the connection ({reason_code})"
            self._cond.notify_all()

    def _on_publish(self, client, userdata, mid, reason_code, properties):
        with self._cond:
            if mid not in self._awaited:
                return
            self._acks[mid] = (int(reason_code.value) if reason_code is not None else 0, str(reason_code))
            self._cond.notify_all()

    def _on_subscribe(self, client, userdata, mid, reason_codes, properties):
        with self._cond:
            self._subacks[mid] = [int(rc.value) for rc in reason_codes]
            self._cond.notify_all()

    def _on_message(self, client, userdata, msg):
        topic = msg.topic
        if topic == RESPONSE_TOPIC:
            try:
                data = json.loads(msg.payload)
                responses = data.get("responses", [])
            except (ValueError, AttributeError):
                return
            with self._cond:
                for r in responses:
                    cid = r.get("correlationData") if isinstance(r, dict) else None
                    if cid in self._responses:
                        self._responses[cid] = r
                self._cond.notify_all()
            return
        with self._cond:
            if self._sweep is None:
                return
            if self._sentinel is not None and topic == SENTINEL_PREFIX + self._token \
                    and msg.payload.decode("utf-8", "replace") == self._sentinel:
                self._sentinel_seen = True
                self._cond.notify_all()
                return
            if msg.retain and (self._sweep_topics is None or topic in self._sweep_topics):
                props = getattr(msg.properties, "UserProperty", None) or []
                self._sweep[topic] = RetainedMessage(topic, bytes(msg.payload), msg.qos, tuple(map(tuple, props)))

    # ------------------------------------------------------------------ waiting

    def _wait(self, ready, what: str, timeout: float | None = None):
        deadline = time.monotonic() + (timeout or self.request_timeout)
        with self._cond:
            while True:
                value = ready()
                if value is not None:
                    return value
                if self._lost:
                    raise TargetError(f"broker {self.url}: {self._lost} while waiting for {what}")
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TargetError(f"broker {self.url} did not answer {what} within "
                                      f"{timeout or self.request_timeout:.0f} s")
                self._cond.wait(left)

    def subscribe(self, topic: str, qos: int = 1) -> list[int]:
        rc, mid = self._client.subscribe(topic, options=SubscribeOptions(qos=qos, retainAsPublished=True))
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise TargetError(f"broker {self.url}: cannot subscribe to {topic!r} ({mqtt.error_string(rc)})")
        return self._wait(lambda: self._subacks.pop(mid, None), f"the subscription to {topic!r}")

    def unsubscribe(self, topic: str) -> None:
        rc, mid = self._client.unsubscribe(topic)
        if rc == mqtt.MQTT_ERR_SUCCESS:
            self._wait(lambda: self._subacks.pop(mid, None), f"the unsubscription from {topic!r}")

    def publish(self, topic: str, payload: bytes | str, *, qos: int = 1, retain: bool = False,
                user_properties: list[tuple[str, str]] | None = None) -> int:
        """Publish and, for QoS 1 and 2, wait for the broker's acknowledgement. Returns its reason code;
        raises PublishRefused when the code is a failure (135 Not authorized, ...)."""
        props = None
        if user_properties:
            props = Properties(PacketTypes.PUBLISH)
            props.UserProperty = list(user_properties)
        # Under the lock, so the acknowledgement cannot be handled before we wait for it; QoS 0
        # publishes are not waited for, and their (local) acknowledgements are ignored.
        with self._cond:
            info = self._client.publish(topic, payload, qos=qos, retain=retain, properties=props)
            if qos:
                self._awaited.add(info.mid)
        if info.rc != mqtt.MQTT_ERR_SUCCESS:
            raise TargetError(f"broker {self.url}: cannot publish to {topic!r} ({mqtt.error_string(info.rc)})")
        if qos == 0:
            return 0
        try:
            code, reason = self._wait(lambda: self._acks.pop(info.mid, None), f"the publish to {topic!r}")
        finally:
            with self._cond:
                self._awaited.discard(info.mid)
                self._acks.pop(info.mid, None)
        if code >= 128:
            raise PublishRefused(reason, code)
        return code

    # ------------------------------------------------------------------ dynamic security

    def request(self, commands: list[dict]) -> list[dict]:
        """Send dynsec commands in one message; their responses, in order, matched by correlationData."""
        cids = []
        with self._cond:
            for cmd in commands:
                self._seq += 1
                cid = f"{self._token}-{self._seq}"
                cmd["correlationData"] = cid
                self._responses[cid] = None
                cids.append(cid)
        payload = json.dumps({"commands": commands}, separators=(",", ":"))
        what = "the dynamic-security request " + ", ".join(c["command"] for c in commands)
        try:
            try:
                self.publish(CONTROL_TOPIC, payload, qos=1)
            except PublishRefused as e:
                raise TargetError(f"broker {self.url} refused {what} ({e.reason}): "
                                  f"user {self.username!r} is not a dynamic-security admin") from None
            try:
                self._wait(lambda: True if all(self._responses.get(c) is not None for c in cids) else None, what)
            except TargetError as e:
                if self._lost:
                    raise
                raise TargetError(f"{e} (is the dynamic-security plugin loaded?)") from None
            return [self._responses[c] for c in cids]
        finally:
            with self._cond:
                for c in cids:
                    self._responses.pop(c, None)

    # ------------------------------------------------------------------ retained messages

    def sweep(self, topic_filter: str = "#", timeout: float = 30.0) -> dict[str, RetainedMessage]:
        """Every retained message matching `topic_filter` (`#`, or one topic), read in one burst on this
        session: ordered after everything this session published (a read-back sees our own publish)."""
        return self._sweep_burst([topic_filter], timeout)

    def read_retained(self, topic_filter: str = "#", timeout: float = 30.0) -> dict[str, RetainedMessage]:
        """The same messages as `sweep`, read by rawsweep.py on a short connection of its own where that
        is safe (the broker assigns client ids, so a second login takes over nobody's session); anything
        it does not handle is swept on this session with paho instead, which also explains any refusal.
        A second connection is not ordered after this session's publishes: for a read, not a read-back."""
        if self.ids_are_usernames is False and not self._raw_sweep_failed:
            ctx = None
            try:
                if self.scheme == "mqtts":
                    ctx = self._probe_context()
                return rawsweep.sweep(self.host, self.port, ctx, self.username, self._password, [topic_filter],
                                      SENTINEL_PREFIX + self._token + "/raw", timeout, RetainedMessage)
            except rawsweep.SweepUnsupported:
                self._raw_sweep_failed = True
            except (TimeoutError, socket.timeout):
                raise TargetError(f"broker {self.url} did not finish the retained-message sweep within "
                                  f"{timeout:g}s: the broker dropped messages queued for this session (its "
                                  f"max_queued_messages is smaller than the retained messages under "
                                  f"{topic_filter!r})") from None
        return self.sweep(topic_filter, timeout)

    def sweep_topics(self, topics: list[str], timeout: float = 30.0) -> dict[str, RetainedMessage]:
        """The retained messages of these topics, asked for by name, SWEEP_BATCH per subscription.

        One `#` burst holds every retained message at once, and what does not fit the session's
        queue (max_queued_messages, 1000 by default, for QoS 0 as soon as the socket backs up) is
        dropped without a word; a batch of literal topics brings at most SWEEP_BATCH messages."""
        found: dict[str, RetainedMessage] = {}
        for i in range(0, len(topics), SWEEP_BATCH):
            found.update(self._sweep_burst(topics[i:i + SWEEP_BATCH], timeout))
        return found

    def _sweep_burst(self, filters: list[str], timeout: float) -> dict[str, RetainedMessage]:
        """Subscribe to `filters`, then a sentinel published on our own topic (or, where the login may
        not publish there, a dynsec round trip) arrives after the last retained message the broker
        queued for us: no fixed sleeps."""
        with self._cond:
            self._sweep = {}
            self._sweep_topics = None if "#" in filters else set(filters)
            self._sentinel = uuid.uuid4().hex
            self._sentinel_seen = False
        sentinel_topic = SENTINEL_PREFIX + self._token
        own = "#" not in filters       # `#` already covers the sentinel's topic
        wanted = ([sentinel_topic] if own else []) + list(filters)
        try:
            codes = self._subscribe_many([(t, 1 if t == sentinel_topic else 2) for t in wanted])
            refused = [t for t, c in zip(wanted, codes) if c >= 128]
            if refused:
                what = refused[0] if len(refused) == 1 else f"{refused[0]!r} and {len(refused) - 1} more"
                raise TargetError(f"user {self.username!r} may not subscribe to {what!r} on {self.url}, "
                                  "so retained messages cannot be read: grant it subscribePattern "
                                  f"{filters[0] if len(filters) == 1 else '#'} (see README.md, MQTT limits)")
            try:
                self.publish(sentinel_topic, self._sentinel, qos=1)
                try:
                    self._wait(lambda: True if self._sentinel_seen else None, "the retained-message sweep", timeout)
                except TargetError as e:
                    if self._lost:
                        raise
                    raise TargetError(f"{e}: the broker dropped messages queued for this session (its "
                                      "max_queued_messages is smaller than the retained messages under "
                                      f"{filters[0]!r})") from None
            except PublishRefused:
                # The broker delivers to us in order, so any response queued after the subscription
                # is also behind the retained burst.
                self.request([{"command": "getDefaultACLAccess"}])
            self._unsubscribe_many(wanted)
            with self._cond:
                return dict(self._sweep)
        finally:
            with self._cond:
                self._sweep = None
                self._sweep_topics = None
                self._sentinel = None

    def _subscribe_many(self, topics: list[tuple[str, int]]) -> list[int]:
        rc, mid = self._client.subscribe([(t, SubscribeOptions(qos=q, retainAsPublished=True)) for t, q in topics])
        if rc != mqtt.MQTT_ERR_SUCCESS:
            raise TargetError(f"broker {self.url}: cannot subscribe to {topics[0][0]!r} ({mqtt.error_string(rc)})")
        return self._wait(lambda: self._subacks.pop(mid, None), f"the subscription to {topics[0][0]!r}")

    def _unsubscribe_many(self, topics: list[str]) -> None:
        rc, mid = self._client.unsubscribe(list(topics))
        if rc == mqtt.MQTT_ERR_SUCCESS:
            self._wait(lambda: self._subacks.pop(mid, None), f"the unsubscription from {topics[0]!r}")

    # ------------------------------------------------------------------ login probes

    def probe_logins(self, logins: list[tuple[str, str]]) -> dict[str, int]:
        """CONNACK reason code of one login as each (username, password): 0 accepted, 135 refused.

        Each login is its own short connection with a random client id, clean start, no will, no
        session, no subscription, closed with DISCONNECT at once: it takes over nobody's session
        (unless the listener uses user names as client ids: check ids_are_usernames first) and
        leaves nothing behind. Raises TargetError when a login cannot be made at all."""
        if not logins:
            return {}
        ctx = self._probe_context() if self.scheme == "mqtts" else None
        with ThreadPoolExecutor(min(PROBE_WORKERS, len(logins)), thread_name_prefix="mqtt-probe") as pool:
            codes = list(pool.map(lambda up: self._probe(ctx, *up), logins))
        return {u: c for (u, _), c in zip(logins, codes)}

    def _probe_context(self) -> ssl.SSLContext:
        # One context for every probe of this connection: a TLS session resumes only in its own.
        if self._probe_ctx is None:
            try:
                self._probe_ctx = ssl.create_default_context(cafile=self.cafile)
            except (OSError, ssl.SSLError) as e:
                raise TargetError(f"cannot use CA file {self.cafile}: {getattr(e, 'strerror', None) or e}") from None
        return self._probe_ctx

    def _probe(self, ctx: ssl.SSLContext | None, username: str, password: str) -> int:
        packet = connect_packet(f"reconciler-probe-{uuid.uuid4().hex}", username, password, receive_maximum=None)
        try:
            sock = socket.create_connection((self.host, self.port), timeout=PROBE_TIMEOUT)
        except OSError as e:
            raise TargetError(f"cannot reach broker {self.url} to test the password of {username!r}: "
                              f"{e.strerror or e}") from None
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if ctx is not None:
                # One full handshake; the later probes resume its TLS session.
                sock = ctx.wrap_socket(sock, server_hostname=self.host, session=self._tls_session)
            sock.sendall(packet)
            head = _read_exactly(sock, 2)
            size, shift, byte = head[1] & 0x7F, 7, head[1]
            while byte & 0x80:
                byte = _read_exactly(sock, 1)[0]
                size |= (byte & 0x7F) << shift
                shift += 7
            body = _read_exactly(sock, size)
            if head[0] != 0x20 or len(body) < 2:
                raise TargetError(f"broker {self.url} answered a login of {username!r} with something "
                                  "other than CONNACK")
            code = body[1]
            if ctx is not None and self._tls_session is None and sock.session is not None \
                    and sock.session.has_ticket:
                self._tls_session = sock.session
            if code == 0:
                sock.sendall(b"\xe0\x00")        # DISCONNECT, normal: no will, nothing kept
            return code
        except (OSError, ssl.SSLError, EOFError) as e:
            raise TargetError(f"broker {self.url}: a login to test the password of {username!r} failed: "
                              f"{getattr(e, 'strerror', None) or e or 'connection closed'}") from None
        finally:
            try:
                sock.close()
            except OSError:
                pass


class _ClientIdRefused(Exception):
    """The broker refused an empty client id (it assigns none)."""


def _read_exactly(sock, n: int) -> bytes:
    buf = b""
    while len(buf) < n:
        chunk = sock.recv(n - len(buf))
        if not chunk:
            raise EOFError("the broker closed the connection")
        buf += chunk
    return buf
