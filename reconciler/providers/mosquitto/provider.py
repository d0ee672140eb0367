"""The Mosquitto provider: reads roles, groups, clients (one verbose dynsec list each) and retained
messages (one sweep) into manifest-shaped Live objects, and carries out one planned action at a time
through `$CONTROL/dynamic-security/v1` or a QoS 1 retained publish. It never decides whether to act.

Connects lazily, on the first read or apply: constructing it touches no network.
"""
from __future__ import annotations

from typing import Any, ClassVar

from ...errors import ApplyError, TargetError
from ...kinds.registry import of_target
from ...model import Action, Live, Options, ResourceId, Snapshot
from ...secrets import fingerprint
from . import marker
from .connection import Connection, PublishRefused, RetainedMessage

DYNSEC_KINDS = {"MqttRole": "listRoles", "MqttGroup": "listGroups", "MqttClient": "listClients"}
DEFAULT_PRIORITY = -1


def _refs(items: list[dict] | None, key: str) -> list[dict]:
    return sorted(({"name": i[key], "priority": i.get("priority", DEFAULT_PRIORITY)} for i in items or ()),
                  key=lambda i: i["name"])


def _acls(items: list[dict] | None) -> list[dict]:
    return sorted(({"type": a["acltype"], "topic": a["topic"], "allow": bool(a.get("allow", False)),
                    "priority": a.get("priority", 0)} for a in items or ()),
                  key=lambda a: (a["type"], a["topic"]))


def _dynsec_acls(acls: list[dict]) -> list[dict]:
    return [{"acltype": a["type"], "topic": a["topic"], "allow": a["allow"], "priority": a["priority"]} for a in acls]


def _dynsec_refs(refs: list[dict], key: str) -> list[dict]:
    return [{key: r["name"], "priority": r["priority"]} for r in refs]


def _live(kind: str, name: str, obj: dict, spec: dict) -> Live:
    description, mark = marker.decode(obj.get("textdescription"))
    spec = {"description": description, "textName": obj.get("textname") or None, **spec}
    # Manifest shape: a field the object does not have is absent, not null (export prints this).
    spec = {k: v for k, v in spec.items() if v is not None}
    labels = {str(k): str(v) for k, v in (mark or {}).get("labels", {}).items()} if mark else {}
    facts: dict[str, Any] = {}
    if mark and isinstance(mark.get("pw"), str):
        facts["fingerprint"] = mark["pw"]
    if mark:
        facts["scope"] = str(mark.get("scope") or marker.DEFAULT_SCOPE)
    return Live(ResourceId(kind, name), spec, labels, managed=mark is not None, facts=facts)


def _topic_live(m: RetainedMessage) -> Live:
    managed, labels, scope = marker.read_properties(list(m.user_properties))
    facts: dict[str, Any] = {"size": len(m.payload), "scope": scope}
    try:
        payload: str | None = m.payload.decode("utf-8")
    except UnicodeDecodeError:
        payload, facts["binary"] = None, True
    return Live(ResourceId("Topic", m.topic), {"retained": {"payload": payload, "qos": m.qos}}, labels,
                managed=managed, facts=facts)


class MosquittoProvider:
    kinds: ClassVar[tuple[str, ...]] = of_target("mqtt")

    def __init__(self, url: str = "mqtt://127.0.0.1:1883", username: str | None = None,
                 password: str | None = None, cafile: str | None = None):
        self.url = url
        self._conn = Connection(url, username, password, cafile)   # validates the URL, no I/O
        self._open = False
        self._scope = marker.DEFAULT_SCOPE

    def __repr__(self) -> str:
        return f"MosquittoProvider({self.url!r}, username={self._conn.username!r})"

    def target(self) -> str:
        return self.url

    def _c(self) -> Connection:
        if not self._open:
            self._conn.open()
            self._open = True
        return self._conn

    def close(self) -> None:
        if self._open:
            self._conn.close()
            self._open = False

    # ------------------------------------------------------------------ read

    def read(self, kinds: frozenset[str] = frozenset(of_target("mqtt"))) -> Snapshot:
        kinds = frozenset(kinds) & set(of_target("mqtt"))
        objects: dict[ResourceId, Live] = {}
        if not kinds:
            return Snapshot({})
        conn = self._c()
        wanted = [k for k in ("MqttRole", "MqttGroup", "MqttClient") if k in kinds]
        if wanted:
            responses = conn.request([{"command": DYNSEC_KINDS[k], "verbose": True, "count": -1, "offset": 0}
                                      for k in wanted])
            for kind, resp in zip(wanted, responses):
                if resp.get("error"):
                    raise TargetError(f"broker {self.url}: {resp['command']} failed: {resp['error']}")
                data = resp.get("data") or {}
                if kind == "MqttRole":
                    for o in data.get("roles", []):
                        objects[ResourceId(kind, o["rolename"])] = _live(kind, o["rolename"], o,
                                                                         {"acls": _acls(o.get("acls"))})
                elif kind == "MqttGroup":
                    for o in data.get("groups", []):
                        objects[ResourceId(kind, o["groupname"])] = _live(
                            kind, o["groupname"], o, {"roles": _refs(o.get("roles"), "rolename")})
                else:
                    for o in data.get("clients", []):
                        objects[ResourceId(kind, o["username"])] = _live(kind, o["username"], o, {
                            "clientId": o.get("clientid") or None,
                            "roles": _refs(o.get("roles"), "rolename"),
                            "groups": _refs(o.get("groups"), "groupname"),
                            "disabled": bool(o.get("disabled", False))})
        if "Topic" in kinds:
            for m in conn.sweep("#").values():
                objects[ResourceId("Topic", m.topic)] = _topic_live(m)
        return Snapshot(objects, {"mqtt_username": conn.username})

    # ------------------------------------------------------------------ apply

    def apply(self, action: Action, options: Options | None = None) -> str:
        self._scope = (options or Options()).scope
        kind = action.id.kind
        if kind == "Topic":
            return self._apply_topic(action)
        if kind not in DYNSEC_KINDS:
            raise ApplyError(f"{action.id}: not a Mosquitto kind")
        if action.verb == "delete":
            cmd = {"MqttRole": ("deleteRole", "rolename"), "MqttGroup": ("deleteGroup", "groupname"),
                   "MqttClient": ("deleteClient", "username")}[kind]
            return self._run(action, [{"command": cmd[0], cmd[1]: action.id.name}])
        if action.verb not in ("create", "update"):
            raise ApplyError(f"{kind} {action.id.name!r}: cannot {action.verb} a {kind}")
        return self._run(action, getattr(self, f"_{action.verb}_{kind}")(action))

    def _run(self, action: Action, commands: list[dict]) -> str:
        if not commands:
            return "nothing to send"
        try:
            responses = self._c().request(commands)
        except TargetError as e:
            raise ApplyError(f"{action.id.kind} {action.id.name!r}: {e}") from None
        errors = [f"{r.get('command')}: {r['error']}" for r in responses if r.get("error")]
        if errors:
            raise ApplyError(f"{action.id.kind} {action.id.name!r}: the broker refused " + "; ".join(errors))
        return ", ".join(c["command"] for c in commands)

    # The textdescription of an object after this action: the declared description (or the live one,
    # when the manifest does not declare it), the labels, and for clients the password fingerprint.
    def _textdescription(self, action: Action, pw: str | None = None) -> str:
        r, live = action.desired, action.live
        if "description" in r.declared or live is None:
            description = r.spec.get("description")
        else:
            description = live.spec.get("description")
        mark: dict[str, Any] = {"labels": dict(sorted(r.labels.items()))}
        if self._scope != marker.DEFAULT_SCOPE:
            mark["scope"] = self._scope
        if pw is None and live is not None:
            pw = live.facts.get("fingerprint")
        if pw:
            mark["pw"] = pw
        return marker.encode(description, mark)

    @staticmethod
    def _paths(action: Action) -> set[str]:
        return {c.path.split("[")[0] for c in action.changes}

    def _text_fields(self, action: Action, cmd: dict, pw: str | None = None) -> None:
        paths = self._paths(action)
        r = action.desired
        if action.live is None or paths & {"spec.description", "metadata.labels", "metadata.managed",
                                           "metadata.scope"} or pw:
            cmd["textdescription"] = self._textdescription(action, pw)
        if "textName" in r.declared and (action.live is None or "spec.textName" in paths):
            cmd["textname"] = r.spec.get("textName") or ""

    def _create_MqttRole(self, action: Action) -> list[dict]:
        cmd = {"command": "createRole", "rolename": action.id.name,
               "acls": _dynsec_acls(action.desired.spec.get("acls", []))}
        self._text_fields(action, cmd)
        return [cmd]

    def _update_MqttRole(self, action: Action) -> list[dict]:
        cmd = {"command": "modifyRole", "rolename": action.id.name}
        self._text_fields(action, cmd)
        if "spec.acls" in self._paths(action):
            # Atomically: the full list replaces the old one.
            cmd["acls"] = _dynsec_acls(action.desired.spec["acls"])
        return [cmd]

    def _create_MqttGroup(self, action: Action) -> list[dict]:
        cmd = {"command": "createGroup", "groupname": action.id.name}
        self._text_fields(action, cmd)
        out = [cmd]
        roles = action.desired.spec.get("roles", [])
        if roles:
            out.append({"command": "modifyGroup", "groupname": action.id.name,
                        "roles": _dynsec_refs(roles, "rolename")})
        return out

    def _update_MqttGroup(self, action: Action) -> list[dict]:
        cmd = {"command": "modifyGroup", "groupname": action.id.name}
        self._text_fields(action, cmd)
        if "spec.roles" in self._paths(action):
            cmd["roles"] = _dynsec_refs(action.desired.spec["roles"], "rolename")
        return [cmd]

    def _create_MqttClient(self, action: Action) -> list[dict]:
        d = action.desired.spec
        cmd: dict[str, Any] = {"command": "createClient", "username": action.id.name}
        pw = None
        if d.get("password") is not None:
            cmd["password"] = d["password"].reveal()
            pw = fingerprint(d["password"].reveal())
        self._text_fields(action, cmd, pw)
        if d.get("clientId"):
            cmd["clientid"] = d["clientId"]
        cmd["roles"] = _dynsec_refs(d.get("roles", []), "rolename")
        cmd["groups"] = _dynsec_refs(d.get("groups", []), "groupname")
        out = [cmd]
        if d.get("disabled"):
            out.append({"command": "disableClient", "username": action.id.name})
        return out

    def _update_MqttClient(self, action: Action) -> list[dict]:
        d = action.desired.spec
        paths = self._paths(action)
        cmd: dict[str, Any] = {"command": "modifyClient", "username": action.id.name}
        pw = None
        if "spec.password" in paths:
            cmd["password"] = d["password"].reveal()
            pw = fingerprint(d["password"].reveal())
        self._text_fields(action, cmd, pw)
        if "spec.clientId" in paths:
            cmd["clientid"] = d.get("clientId") or ""
        if "spec.roles" in paths:
            cmd["roles"] = _dynsec_refs(d["roles"], "rolename")
        if "spec.groups" in paths:
            cmd["groups"] = _dynsec_refs(d["groups"], "groupname")
        out = [cmd] if len(cmd) > 2 else []
        if "spec.disabled" in paths:
            out.append({"command": "disableClient" if d["disabled"] else "enableClient", "username": action.id.name})
        return out

    def _apply_topic(self, action: Action) -> str:
        topic = action.id.name
        conn = self._c()
        try:
            if action.verb == "delete":
                conn.publish(topic, b"", qos=1, retain=True)
                return "retained message cleared"
            if action.verb not in ("create", "update"):
                raise ApplyError(f"Topic {topic!r}: cannot {action.verb} a Topic")
            want = action.desired.spec["retained"]
            props = marker.user_properties(dict(action.desired.labels), self._scope)
            payload = want["payload"].encode("utf-8")
            conn.publish(topic, payload, qos=want["qos"], retain=True, user_properties=props)
            if want["qos"] != 1:
                # QoS 0 has no acknowledgement, and paho ignores the reason code of a QoS 2 PUBREC:
                # read the retained message back to know the broker kept this one.
                got = conn.sweep(topic).get(topic)
                if got is None or got.payload != payload or got.qos != want["qos"] \
                        or sorted(map(tuple, got.user_properties)) != sorted(map(tuple, props)):
                    raise ApplyError(f"Topic {topic!r}: the broker did not keep the QoS {want['qos']} retained "
                                     f"message (Not authorized? user {conn.username!r} needs publishClientSend "
                                     "on this topic)")
            return f"retained message published (QoS {want['qos']})"
        except PublishRefused as e:
            raise ApplyError(f"Topic {topic!r}: the broker refused the publish ({e.reason}, reason code {e.code}); "
                             f"user {conn.username!r} needs publishClientSend on this topic") from None
        except TargetError as e:
            raise ApplyError(f"Topic {topic!r}: {e}") from None
