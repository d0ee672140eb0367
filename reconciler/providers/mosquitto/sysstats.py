"""The status read of the broker: Mosquitto's `$SYS/#` topics in one burst, as a frozen BrokerStats.

Mosquitto publishes `$SYS/broker/...` as retained messages every `sys_interval` (10 s by default), so a
subscription receives the current values at once; a dynamic-security round trip after the subscription
proves the burst is complete (the broker delivers to one client in order), as the retained sweep does.
The figures are the broker's own, as of its last `$SYS` update.
"""
from __future__ import annotations

from dataclasses import dataclass

from ...errors import TargetError
from .connection import Connection

SYS_FILTER = "$SYS/#"


@dataclass(frozen=True)
class BrokerStats:
    url: str
    version: str | None
    uptime_seconds: int | None
    clients_connected: int | None
    clients_total: int | None
    messages_received_total: int | None       # every MQTT packet type, since the broker started
    messages_sent_total: int | None
    publish_received_total: int | None
    publish_sent_total: int | None
    bytes_received_total: int | None
    bytes_sent_total: int | None
    # $SYS/broker/load/messages/*/1min is messages per minute, averaged over the last minute.
    received_per_second: float | None
    sent_per_second: float | None
    retained_messages: int | None
    subscriptions: int | None
    raw: tuple = ()                          # ((topic, text), ...) everything read, for -o json


class _SysConnection(Connection):
    """The shared connection, with `$SYS` messages collected instead of dropped."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.sys: dict[str, str] = {}

    def _on_message(self, client, userdata, msg):
        if msg.topic.startswith("$SYS/"):
            with self._cond:
                self.sys[msg.topic] = msg.payload.decode("utf-8", "replace")
            return
        super()._on_message(client, userdata, msg)


def _number(text: str | None, kind=int):
    if text is None:
        return None
    try:
        return kind(text.split()[0])       # "11 seconds" -> 11
    except (ValueError, IndexError):
        return None


def read(url: str, username: str | None, password: str | None, cafile: str | None = None) -> BrokerStats:
    conn = _SysConnection(url, username, password, cafile)
    conn.open()
    try:
        codes = conn.subscribe(SYS_FILTER, qos=0)
        if codes[0] >= 128:
            raise TargetError(f"user {username!r} may not subscribe to {SYS_FILTER} on {url}, so the broker's "
                              f"figures cannot be read: grant it subscribePattern {SYS_FILTER}")
        # In-order delivery: this response is queued behind the retained $SYS burst.
        conn.request([{"command": "getDefaultACLAccess"}])
        conn.unsubscribe(SYS_FILTER)
        with conn._cond:
            sys = dict(conn.sys)
    finally:
        conn.close()
    if not sys:
        raise TargetError(f"broker {url} published no $SYS topics (is sys_interval 0 in its configuration?)")

    def g(key: str, kind=int):
        return _number(sys.get("$SYS/broker/" + key), kind)

    def per_second(key: str) -> float | None:
        v = g(key, float)
        return None if v is None else v / 60.0

    version = sys.get("$SYS/broker/version")
    return BrokerStats(
        url=url, version=version.removeprefix("mosquitto version ") if version else None,
        uptime_seconds=g("uptime"), clients_connected=g("clients/connected"), clients_total=g("clients/total"),
        messages_received_total=g("messages/received"), messages_sent_total=g("messages/sent"),
        publish_received_total=g("publish/messages/received"), publish_sent_total=g("publish/messages/sent"),
        bytes_received_total=g("bytes/received"), bytes_sent_total=g("bytes/sent"),
        received_per_second=per_second("load/messages/received/1min"),
        sent_per_second=per_second("load/messages/sent/1min"),
        retained_messages=g("retained messages/count"), subscriptions=g("subscriptions/count"),
        raw=tuple(sorted(sys.items())))
