"""The Mosquitto provider: reads roles, groups, clients and the broker-wide defaults (one dynsec request,
which the broker answers atomically) and retained messages (one sweep) into manifest-shaped Live
objects, and carries out one planned action at a time through `$CONTROL/dynamic-security/v1` or a
QoS 1 retained publish. It never decides whether to act.

What only a declared value can tell is read for the objects `declare` named: whether the broker
still accepts a client's declared password (a throwaway login, see probe_logins), and the retained
message of each declared topic that the `#` sweep did not bring (asked for by name).

Connects lazily, on the first read or apply: constructing it touches no network.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, ClassVar, Iterable

from ...errors import ApplyError, TargetError
from ...kinds.registry import of_target
from ...kinds.mqtt import ACL_ACCESS, DEFAULTS_NAME, has_wildcards
from ...model import Action, Live, Options, Resource, ResourceId, Snapshot
from ...secrets import fingerprint
from . import marker
from .connection import Connection, PublishRefused, RetainedMessage

DYNSEC_KINDS = {"MqttRole": "listRoles", "MqttGroup": "listGroups", "MqttClient": "listClients"}
DEFAULT_PRIORITY = -1
# CONNACK reason codes of a refused login (2.0.11 answers 135 for a wrong password, a wrong client id
# and a disabled client alike).
LOGIN_REFUSED = (0x86, 0x87)
MAX_MQTT_STRING = 65535


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
    scope = str(mark.get("scope") or marker.DEFAULT_SCOPE) if mark else marker.DEFAULT_SCOPE
    return Live(ResourceId(kind, name), spec, labels, managed=mark is not None, facts=facts, scope=scope)


def _topic_live(m: RetainedMessage) -> Live:
    managed, labels, scope = marker.read_properties(list(m.user_properties))
    facts: dict[str, Any] = {"size": len(m.payload)}
    try:
        payload: str | None = m.payload.decode("utf-8")
    except UnicodeDecodeError:
        payload, facts["binary"] = None, True
    return Live(ResourceId("Topic", m.topic), {"retained": {"payload": payload, "qos": m.qos}}, labels,
                managed=managed, facts=facts, scope=scope)


class MosquittoProvider:
    kinds: ClassVar[tuple[str, ...]] = of_target("mqtt")

    def __init__(self, url: str = "mqtt://127.0.0.1:1883", username: str | None = None,
                 password: str | None = None, cafile: str | None = None):
        self.url = url
        self._conn = Connection(url, username, password, cafile)   # validates the URL, no I/O
        self._open = False

    @staticmethod
    def _declared(resources: Iterable[Resource]) -> tuple[dict[str, Any], list[str]]:
        """From the objects the manifests declare: each declared client's password (a Secret), which the
        read tests by a login, and the declared topics that can hold a retained message, which it asks
        for by name when the sweep did not bring them."""
        passwords: dict[str, Any] = {}
        topics = set()
        for r in resources:
            if r.id.kind == "MqttClient" and r.spec.get("password") is not None:
                passwords[r.id.name] = r.spec["password"]
            elif r.id.kind == "Topic" and not has_wildcards(r.id.name) and not r.id.name.startswith("$"):
                topics.add(r.id.name)
        return passwords, sorted(topics)

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

    def read(self, kinds: frozenset[str] = frozenset(of_target("mqtt")), desired: Iterable[Resource] = ()) -> Snapshot:
        """Every live object of `kinds`. `desired` (the declared resources) lets the read find what only a
        declared value can tell; without it, the read relies on the fingerprints and the sweep alone."""
        passwords, declared_topics = self._declared(desired)
        kinds = frozenset(kinds) & set(of_target("mqtt"))
        objects: dict[ResourceId, Live] = {}
        if not kinds:
            return Snapshot({})
        conn = self._c()
        wanted = [k for k in ("MqttRole", "MqttGroup", "MqttClient") if k in kinds]
        commands = [{"command": DYNSEC_KINDS[k], "verbose": True, "count": -1, "offset": 0} for k in wanted]
        # The anonymous group is read with the groups too: it must never be deleted (see MqttGroupRules).
        defaults = bool(kinds & {"MqttDefaults", "MqttGroup"})
        if defaults:
            commands += [{"command": "getDefaultACLAccess"}, {"command": "getAnonymousGroup"}]
        # One message: the broker answers all its commands in one go, so the lists agree with each
        # other (nothing listed here can have vanished from another list of the same read).
        responses = conn.request(commands) if commands else []
        for resp in responses:
            if resp.get("error"):
                raise TargetError(f"broker {self.url}: {resp['command']} failed: {resp['error']}")
        for kind, resp in zip(wanted, responses):
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
        if defaults:
            access = {a.get("acltype"): bool(a.get("allow")) for a in (responses[-2].get("data") or {}).get("acls", [])}
            anonymous = ((responses[-1].get("data") or {}).get("group") or {}).get("groupname") or ""
            gid = ResourceId("MqttGroup", anonymous)
            if gid in objects:
                objects[gid] = replace(objects[gid], facts={**objects[gid].facts, "anonymous": True})
            if "MqttDefaults" in kinds:
                # No marker: the broker's defaults have nowhere to hold one (and are never pruned).
                objects[ResourceId("MqttDefaults", DEFAULTS_NAME)] = Live(
                    ResourceId("MqttDefaults", DEFAULTS_NAME),
                    {"aclAccess": {k: access[k] for k in ACL_ACCESS if k in access}, "anonymousGroup": anonymous})
        if "MqttClient" in kinds and passwords:
            self._test_passwords(conn, objects, passwords)
        if "Topic" in kinds:
            found = conn.read_retained("#")
            missing = [t for t in declared_topics if t not in found]
            if missing:
                found.update(conn.sweep_topics(missing))
            for m in found.values():
                objects[ResourceId("Topic", m.topic)] = _topic_live(m)
        return Snapshot(objects)

    def _test_passwords(self, conn: Connection, objects: dict[ResourceId, Live], passwords: dict[str, Any]) -> None:
        """Whether the broker still accepts each declared client's password: a password changed by
        hand (setClientPassword) leaves our fingerprint as it was, so only a login can tell. Sets the
        fact `login` (accepted | refused) or `login_untested` (why no login was made)."""
        logins: list[tuple[str, str]] = []
        for name, secret in sorted(passwords.items()):
            rid = ResourceId("MqttClient", name)
            live = objects.get(rid)
            if live is None:
                continue
            # No fingerprint check here (it costs as much as the login): a pending rotation's login
            # is refused, and the plan changes that password anyway.
            why = self._untestable(conn, live, secret.reveal())
            if why:
                objects[rid] = replace(live, facts={**live.facts, "login_untested": why})
            else:
                logins.append((name, secret.reveal()))
        codes = conn.probe_logins(logins)
        refused = [n for n, c in codes.items() if c in LOGIN_REFUSED]
        for name, code in codes.items():
            rid = ResourceId("MqttClient", name)
            if code == 0:
                objects[rid] = replace(objects[rid], facts={**objects[rid].facts, "login": "accepted"})
            elif code not in LOGIN_REFUSED:
                objects[rid] = replace(objects[rid], facts={
                    **objects[rid].facts, "login_untested": f"the broker answered the test login with reason code {code}"})
        if not refused:
            return
        # A refusal can also mean the client went, or was disabled or tied to a client id, since the
        # list: ask again, and read a client that has gone as gone.
        answers = conn.request([{"command": "getClient", "username": n} for n in refused])
        for name, resp in zip(refused, answers):
            rid = ResourceId("MqttClient", name)
            if resp.get("error") == "Client not found":
                del objects[rid]
                continue
            if resp.get("error"):
                raise TargetError(f"broker {self.url}: getClient {name!r} failed: {resp['error']}")
            now = (resp.get("data") or {}).get("client") or {}
            if now.get("disabled") or now.get("clientid"):
                objects[rid] = replace(objects[rid], facts={
                    **objects[rid].facts, "login_untested": "it was disabled or given a client id during the read"})
            else:
                objects[rid] = replace(objects[rid], facts={**objects[rid].facts, "login": "refused"})

    @staticmethod
    def _untestable(conn: Connection, live: Live, password: str) -> str | None:
        """Why a login as this client could disturb it or tell nothing, or None when it is safe."""
        if live.spec.get("clientId"):
            return ("it has a fixed clientId: dynsec refuses any other client id before it checks the "
                    "password, and a login with its own id would disconnect the device")
        if live.spec.get("disabled"):
            return "it is disabled: the broker refuses every login of a disabled client"
        if conn.ids_are_usernames:
            return ("the broker's listener uses user names as client ids (use_username_as_clientid): "
                    "a test login would disconnect the device")
        if conn.ids_are_usernames is None:
            return ("the broker assigns no client ids, so whether it uses user names as client ids "
                    "(and a test login would disconnect the device) is unknown")
        if len(password.encode()) > MAX_MQTT_STRING or len(live.id.name.encode()) > MAX_MQTT_STRING:
            return "the password is longer than MQTT can carry"
        return None

    # ------------------------------------------------------------------ apply

    def apply(self, action: Action, options: Options | None = None) -> str:
        kind = action.id.kind
        if kind == "Topic":
            return self._apply_topic(action)
        if kind == "MqttDefaults":
            if action.verb != "update":
                raise ApplyError(f"MqttDefaults {action.id.name!r}: the broker's defaults are only ever updated")
            return self._run(action, self._update_MqttDefaults(action))
        if kind not in DYNSEC_KINDS:
            raise ApplyError(f"{action.id}: not a Mosquitto kind")
        if action.verb == "delete":
            if kind == "MqttGroup":
                self._refuse_anonymous_group(action)
            cmd = {"MqttRole": ("deleteRole", "rolename"), "MqttGroup": ("deleteGroup", "groupname"),
                   "MqttClient": ("deleteClient", "username")}[kind]
            return self._run(action, [{"command": cmd[0], cmd[1]: action.id.name}])
        if action.verb not in ("create", "update"):
            raise ApplyError(f"{kind} {action.id.name!r}: cannot {action.verb} a {kind}")
        return self._run(action, HANDLERS[(action.verb, kind)](self, action))

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
        if action.scope != marker.DEFAULT_SCOPE:
            mark["scope"] = action.scope
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

    # Role memberships go through add/removeClientRole and add/removeGroupRole only: Mosquitto 2.0.11's
    # createClient, createGroup and modifyGroup keep a role without telling the role, so a role deleted
    # later leaves a dangling pointer and the next verbose list (every plan) can crash the broker.
    @staticmethod
    def _role_commands(action: Action, add: str, remove: str, key: str) -> list[dict]:
        removes, adds = [], []
        for c in action.changes:
            if not c.path.startswith("spec.roles["):
                continue
            role = c.path[len("spec.roles["):-1]
            if c.before is not None:        # removed, or its priority changed: remove, then add
                removes.append({"command": remove, key: action.id.name, "rolename": role})
            if c.after is not None:
                adds.append({"command": add, key: action.id.name, "rolename": role,
                             "priority": c.after.get("priority", DEFAULT_PRIORITY)})
        return removes + adds

    def _create_MqttGroup(self, action: Action) -> list[dict]:
        cmd = {"command": "createGroup", "groupname": action.id.name}
        self._text_fields(action, cmd)
        return [cmd] + [{"command": "addGroupRole", "groupname": action.id.name, "rolename": r["name"],
                         "priority": r["priority"]} for r in action.desired.spec.get("roles", [])]

    def _update_MqttGroup(self, action: Action) -> list[dict]:
        cmd = {"command": "modifyGroup", "groupname": action.id.name}
        self._text_fields(action, cmd)
        out = [cmd] if len(cmd) > 2 else []
        return out + self._role_commands(action, "addGroupRole", "removeGroupRole", "groupname")

    def _refuse_anonymous_group(self, action: Action) -> None:
        """Checked again just before the delete (the plan may be older than the broker's setting):
        deleting the anonymous group leaves Mosquitto 2.0.11 a dangling pointer and it crashes."""
        try:
            resp = self._c().request([{"command": "getAnonymousGroup"}])[0]
        except TargetError as e:
            raise ApplyError(f"MqttGroup {action.id.name!r}: {e}") from None
        if ((resp.get("data") or {}).get("group") or {}).get("groupname") == action.id.name:
            raise ApplyError(f"MqttGroup {action.id.name!r} is the broker's anonymous group: never deleted "
                             "(deleting it crashes Mosquitto 2.0.11); set another anonymousGroup first")

    def _update_MqttDefaults(self, action: Action) -> list[dict]:
        d = action.desired.spec
        paths = self._paths(action)
        out = []
        acls = [{"acltype": k, "allow": d["aclAccess"][k]} for k in ACL_ACCESS if f"spec.aclAccess.{k}" in paths]
        if acls:
            out.append({"command": "setDefaultACLAccess", "acls": acls})
        if "spec.anonymousGroup" in paths:
            # Kicks the anonymous clients connected now, so they reconnect with the new group's rights.
            out.append({"command": "setAnonymousGroup", "groupname": d["anonymousGroup"]})
        return out

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
        # Groups here are safe (the group is told); roles are not: addClientRole each (see _role_commands).
        cmd["groups"] = _dynsec_refs(d.get("groups", []), "groupname")
        out = [cmd] + [{"command": "addClientRole", "username": action.id.name, "rolename": r["name"],
                        "priority": r["priority"]} for r in d.get("roles", [])]
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
        if "spec.groups" in paths:
            cmd["groups"] = _dynsec_refs(d["groups"], "groupname")
        out = [cmd] if len(cmd) > 2 else []
        out += self._role_commands(action, "addClientRole", "removeClientRole", "username")
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
            props = marker.user_properties(dict(action.desired.labels), action.scope)
            payload = want["payload"].encode("utf-8")
            conn.publish(topic, payload, qos=want["qos"], retain=True, user_properties=props)
            if want["qos"] != 1:
                # QoS 0 has no acknowledgement, and paho ignores the reason code of a QoS 2 PUBREC:
                # read the retained message back to know the broker kept this one. On this session
                # (sweep, not read_retained): only there is the read ordered after our own publish.
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


# Which method carries out (verb, kind) for the dynsec kinds: registered here, not found by name.
HANDLERS = {
    ("create", "MqttRole"): MosquittoProvider._create_MqttRole,
    ("update", "MqttRole"): MosquittoProvider._update_MqttRole,
    ("create", "MqttGroup"): MosquittoProvider._create_MqttGroup,
    ("update", "MqttGroup"): MosquittoProvider._update_MqttGroup,
    ("create", "MqttClient"): MosquittoProvider._create_MqttClient,
    ("update", "MqttClient"): MosquittoProvider._update_MqttClient,
}
