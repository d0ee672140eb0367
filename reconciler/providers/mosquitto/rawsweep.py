"""The retained-message sweep read on a short connection of its own with a minimal MQTT v5 packet
reader, instead of through paho.

Why: paho builds an MQTTMessage and a Properties object per PUBLISH and logs each one; for a sweep
of 5,000 retained messages that was 1.3 s of CPU, a quarter of a no-op plan (docs/benchmarks.md).
This reader keeps only what the sweep needs (topic, payload, QoS, user properties) and acknowledges
in batches. It does the same exchange the paho sweep does: subscribe (QoS 2, retain-as-published),
publish a sentinel to our own topic, and read until the sentinel comes back: the broker delivers in
order, so every retained message queued for the subscription has arrived by then.

Anything it does not handle (a refused subscription or sentinel, a property it does not know, a
topic that is not UTF-8, a broker that assigns the user name as client id) raises SweepUnsupported,
and the caller sweeps with paho, which explains the problem in its own words. Only the transport
is ours: the connection is a fresh clean-start session with a random client id, no will and no
session expiry, closed with DISCONNECT, so it takes over nobody's session and leaves nothing behind.
"""
from __future__ import annotations

import socket
import ssl
import time
import uuid

READ_CHUNK = 256 * 1024


class SweepUnsupported(Exception):
    """This reader cannot do the sweep here; sweep with paho."""


def _s(b: bytes) -> bytes:
    return len(b).to_bytes(2, "big") + b


def _varint(n: int) -> bytes:
    out = bytearray()
    while True:
        n, digit = divmod(n, 128)
        out.append(digit | (0x80 if n else 0))
        if not n:
            return bytes(out)


def _packet(first: int, body: bytes) -> bytes:
    return bytes([first]) + _varint(len(body)) + body


def connect_packet(client_id: str, username: str | None, password: str | None,
                   receive_maximum: int | None = 65535) -> bytes:
    """An MQTT v5 CONNECT: clean start, keep-alive 0, no will, no session expiry (the session ends with
    the connection). The sweep asks for Receive Maximum 65535 (the whole burst in flight); the
    password probes (connection.py) send no properties at all."""
    flags = 0x02                                   # clean start
    tail = b""
    if username is not None:
        flags |= 0x80
        tail += _s(username.encode())
        if password is not None:
            flags |= 0x40
            tail += _s(password.encode())
    props = b"" if receive_maximum is None else b"\x21" + receive_maximum.to_bytes(2, "big")
    body = _s(b"MQTT") + bytes([5, flags]) + b"\x00\x00" + _varint(len(props)) + props \
        + _s(client_id.encode()) + tail
    return _packet(0x10, body)


def _props(buf: bytes, i: int, end: int) -> list[tuple[str, str]]:
    """The user properties among a PUBLISH's properties buf[i:end]; SweepUnsupported on an unknown one."""
    users: list[tuple[str, str]] = []
    while i < end:
        pid = buf[i]
        i += 1
        if pid == 0x01:                                   # payload format indicator
            i += 1
        elif pid == 0x02:                                 # message expiry interval
            i += 4
        elif pid == 0x23:                                 # topic alias
            i += 2
        elif pid in (0x03, 0x08, 0x09):                   # content type, response topic, correlation data
            i += 2 + int.from_bytes(buf[i:i + 2], "big")
        elif pid == 0x0B:                                 # subscription identifier (a varint)
            while buf[i] & 0x80:
                i += 1
            i += 1
        elif pid == 0x26:                                 # user property: a pair of strings
            n = int.from_bytes(buf[i:i + 2], "big")
            k = bytes(buf[i + 2:i + 2 + n]).decode("utf-8")
            i += 2 + n
            n = int.from_bytes(buf[i:i + 2], "big")
            v = bytes(buf[i + 2:i + 2 + n]).decode("utf-8")
            i += 2 + n
            users.append((k, v))
        else:
            raise SweepUnsupported(f"PUBLISH property 0x{pid:02x}")
    if i != end:
        raise SweepUnsupported("malformed PUBLISH properties")
    return users


def sweep(host: str, port: int, ctx: ssl.SSLContext | None, username: str | None, password: str | None,
          filters: list[str], sentinel_topic: str, timeout: float, make):
    """{topic: make(topic, payload, qos, user_properties)} of every retained message under `filters`."""
    deadline = time.monotonic() + timeout
    literal = None if "#" in filters else set(filters)
    sentinel = uuid.uuid4().hex.encode()
    try:
        sock = socket.create_connection((host, port), timeout=timeout)
    except OSError as e:
        raise SweepUnsupported(f"connect: {e}") from None
    try:
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if ctx is not None:
            sock = ctx.wrap_socket(sock, server_hostname=host)
        client_id = f"reconciler-sweep-{uuid.uuid4().hex[:16]}"
        sock.sendall(connect_packet(client_id, username, password))
        wanted = ([] if literal is None else [sentinel_topic]) + list(filters)
        sub = b"\x00\x01" + b"\x00" + b"".join(
            _s(t.encode()) + bytes([0x01 if t == sentinel_topic else 0x0A]) for t in wanted)   # QoS 2 + RAP
        found: dict = {}
        buf = bytearray()
        state = {"connack": False, "suback": False, "puback": False, "done": False}
        out = bytearray()

        def handle(first: int, body: memoryview) -> None:
            kind = first >> 4
            if kind == 3:                                    # PUBLISH
                qos = (first >> 1) & 3
                n = int.from_bytes(body[0:2], "big")
                try:
                    topic = bytes(body[2:2 + n]).decode("utf-8")
                except UnicodeDecodeError:
                    raise SweepUnsupported("a topic that is not UTF-8") from None
                i = 2 + n
                if qos:
                    pid = bytes(body[i:i + 2])
                    i += 2
                    # QoS 1: PUBACK; QoS 2: PUBREC now, PUBCOMP on the broker's PUBREL.
                    out.extend((b"\x40\x02" if qos == 1 else b"\x50\x02") + pid)
                plen, shift = 0, 0
                while True:
                    b = body[i]
                    i += 1
                    plen |= (b & 0x7F) << shift
                    shift += 7
                    if not b & 0x80:
                        break
                users = _props(body, i, i + plen) if plen else []
                payload = bytes(body[i + plen:])
                if topic == sentinel_topic and payload == sentinel:
                    state["done"] = True
                elif first & 1 and (literal is None or topic in literal):
                    found[topic] = make(topic, payload, qos, tuple(users))
            elif kind == 6:                                  # PUBREL
                out.extend(b"\x70\x02" + bytes(body[0:2]))
            elif kind == 2:                                  # CONNACK
                if len(body) < 2 or body[1] != 0:
                    raise SweepUnsupported(f"CONNACK {body[1] if len(body) > 1 else '?'}")
                state["connack"] = True
            elif kind == 9:                                  # SUBACK
                codes = bytes(body[2 + 1 + body[2]:]) if len(body) > 2 else b""
                if any(c >= 0x80 for c in codes):
                    raise SweepUnsupported("a subscription was refused")
                state["suback"] = True
            elif kind == 4:                                  # PUBACK of the sentinel
                if len(body) > 2 and body[2] >= 0x80:
                    raise SweepUnsupported("the sentinel publish was refused")
                state["puback"] = True
            elif kind == 14:                                 # DISCONNECT from the broker
                raise SweepUnsupported("the broker disconnected")

        def pump(until: str) -> None:
            while not state[until]:
                # Every complete packet in the buffer, then the acknowledgements they need in one write.
                i = 0
                mv = memoryview(buf)
                try:
                    while True:
                        if len(buf) - i < 2:
                            break
                        size, shift, j = 0, 0, i + 1
                        while True:
                            if j >= len(buf):
                                size = -1
                                break
                            b = buf[j]
                            j += 1
                            size |= (b & 0x7F) << shift
                            shift += 7
                            if not b & 0x80:
                                break
                        if size < 0 or len(buf) - j < size:
                            break
                        handle(buf[i], mv[j:j + size])
                        i = j + size
                        if state[until]:
                            break
                finally:
                    mv.release()
                del buf[:i]
                if out:
                    sock.sendall(out)
                    out.clear()
                if state[until]:
                    return
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                sock.settimeout(left)
                chunk = sock.recv(READ_CHUNK)
                if not chunk:
                    raise SweepUnsupported("the broker closed the connection")
                buf.extend(chunk)

        pump("connack")
        sock.sendall(_packet(0x82, sub))
        pump("suback")
        sock.sendall(_packet(0x32, _s(sentinel_topic.encode()) + b"\x00\x02" + b"\x00" + sentinel))
        pump("done")
        try:
            sock.sendall(b"\xe0\x00")                        # DISCONNECT, normal: nothing kept
        except OSError:
            pass
        return found
    except (OSError, ssl.SSLError, IndexError, ValueError) as e:
        if isinstance(e, TimeoutError) or isinstance(e, socket.timeout):
            raise
        raise SweepUnsupported(str(e) or type(e).__name__) from None
    finally:
        try:
            sock.close()
        except OSError:
            pass
