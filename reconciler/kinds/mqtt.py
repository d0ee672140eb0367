"""PURE rules of the MQTT kinds (MqttRole, MqttGroup, MqttClient, Topic, MqttDefaults): checking and normalising declared
specs, the references they make, and classifying desired vs live into actions with reasons. No I/O here
except reading a client's password source in check/normalise (so that validate names a missing one).

Comparison rules, in one place:
- an ACL list is a set keyed by (type, topic); role and group memberships are sets keyed by name;
  each differing entry is its own FieldChange (`spec.acls[subscribeLiteral edge/gw-1/config]`),
  so --diff shows them field by field;
- a role's effective ACLs are its own `acls` plus those the Topics give it: publishClientSend for
  `publishers`, subscribeLiteral (subscribePattern for a filter with wildcards) for `subscribers`;
  the role's own entry wins when both name the same (type, topic);
- only declared fields are compared (description, textName, clientId, roles, groups, a role's acls
  unless Topics give it some), plus `disabled` (default false) and the labels;
- a password is compared by verifying the resolved secret against the salted fingerprint kept in
  the client's marker (changed or unknown), and by the provider's test login with it (refused: the
  password was changed on the broker): either way one write-only change, never a value;
- MqttDefaults compares only the declared aclAccess entries and anonymousGroup; it is never created,
  deleted or pruned, and the group that is the broker's anonymous group is never pruned.
"""
from __future__ import annotations

import json
import os
import unicodedata
from dataclasses import replace
from typing import Any, Iterable

from ..errors import ManifestError
from ..model import Action, FieldChange, Live, Resource, ResourceId
from ..secrets import Secret, describe, read_secret, verify
from .context import PlanContext

ACL_TYPES = ("publishClientSend", "publishClientReceive", "subscribeLiteral", "subscribePattern",
             "unsubscribeLiteral", "unsubscribePattern")
# dynsec's own default priority of a role or group membership (it lists no priority for it).
DEFAULT_MEMBER_PRIORITY = -1
MAX_TOPIC_BYTES = 65535
# dynsec's default ACL access types (getDefaultACLAccess / setDefaultACLAccess).
ACL_ACCESS = ("publishClientSend", "publishClientReceive", "subscribe", "unsubscribe")
# The one MqttDefaults object per broker.
DEFAULTS_NAME = "default"
ANONYMOUS_GROUP_KEPT = ("the broker's anonymous group: never deleted, --prune included (deleting it crashes "
                        "Mosquitto 2.0.11); point MqttDefaults.anonymousGroup elsewhere first")


# --------------------------------------------------------------------------- topics

def has_wildcards(topic: str) -> bool:
    return any(level in ("+", "#") for level in topic.split("/"))


def topic_problem(topic: Any) -> str | None:
    """Why `topic` is not a valid MQTT topic name or filter, or None."""
    if not isinstance(topic, str) or topic == "":
        return "a topic must be a non-empty string"
    try:
        raw = topic.encode("utf-8")
    except UnicodeEncodeError:
        return "a topic must be valid UTF-8 (it holds a lone surrogate)"
    if "\0" in topic:
        return "a topic must not contain NUL"
    if len(raw) > MAX_TOPIC_BYTES:
        return f"a topic is at most {MAX_TOPIC_BYTES} bytes, this one is {len(raw)}"
    bad = next((c for c in topic if unicodedata.category(c) == "Cc"), None)
    if bad is not None:
        return f"a topic must not contain control character U+{ord(bad):04X}"
    levels = topic.split("/")
    for i, level in enumerate(levels):
        if "+" in level and level != "+":
            return f"'+' must be a whole level (level {i + 1} is {level!r})"
        if "#" in level and level != "#":
            return f"'#' must be a whole level (level {i + 1} is {level!r})"
        if level == "#" and i != len(levels) - 1:
            return "'#' may only be the last level"
    return None


def _dup_names(items: list, path: tuple) -> list:
    seen: dict[str, int] = {}
    out = []
    for i, it in enumerate(items):
        n = it["name"] if isinstance(it, dict) else it
        if n in seen:
            out.append((path + (i,), f"{n!r} is listed twice (first at index {seen[n]})"))
        seen.setdefault(n, i)
    return out


def _norm_refs(items: Iterable[dict]) -> list[dict]:
    return sorted(({"name": i["name"], "priority": i.get("priority", DEFAULT_MEMBER_PRIORITY)} for i in items),
                  key=lambda i: i["name"])


def _norm_acl(a: dict) -> dict:
    return {"type": a["type"], "topic": a["topic"], "allow": a.get("allow", True), "priority": a.get("priority", 0)}


def acl_key(a: dict) -> tuple[str, str]:
    return (a["type"], a["topic"])


def sort_acls(acls: Iterable[dict]) -> list[dict]:
    return sorted(acls, key=acl_key)


def _text(spec: dict, key: str) -> str | None:
    return spec.get(key) or None


# --------------------------------------------------------------------------- shared classify helpers

def _noop(r: Resource, live: Live | None, reason: str) -> Action:
    return Action("noop", r.id, reason, desired=r, live=live)


def _ownership_changes(live: Live, ctx: PlanContext) -> list[FieldChange]:
    """Adoption of an unmarked object, or moving a marked one into this run's scope."""
    if not live.managed:
        return [FieldChange("metadata.managed", False, True)]
    scope = live.scope
    if scope != ctx.options.scope:
        return [FieldChange("metadata.scope", scope, ctx.options.scope)]
    return []


def _common_changes(r: Resource, live: Live, fields: tuple[str, ...], ctx: PlanContext) -> list[FieldChange]:
    """Ownership, declared text fields and labels."""
    ch = _ownership_changes(live, ctx)
    for f in fields:
        if f in r.declared and r.spec.get(f) != live.spec.get(f):
            ch.append(FieldChange(f"spec.{f}", live.spec.get(f), r.spec.get(f)))
    if dict(r.labels) != dict(live.labels):
        ch.append(FieldChange("metadata.labels", dict(live.labels), dict(r.labels)))
    return ch


def keyed_changes(field: str, before: Iterable[dict], after: Iterable[dict], key, label) -> list[FieldChange]:
    """One FieldChange per entry added, removed or changed, comparing two lists as sets keyed by `key`;
    the entry's other fields are its value."""
    b = {key(x): x for x in before}
    a = {key(x): x for x in after}
    out = []
    for k in sorted(set(a) | set(b)):
        bv = {f: v for f, v in b[k].items() if f not in ("type", "topic", "name")} if k in b else None
        av = {f: v for f, v in a[k].items() if f not in ("type", "topic", "name")} if k in a else None
        if bv != av:
            out.append(FieldChange(f"spec.{field}[{label(k)}]", bv, av))
    return out


def _ref_changes(field: str, before, after) -> list[FieldChange]:
    return keyed_changes(field, before or [], after or [], lambda x: x["name"], lambda k: k)


def _count(changes: list[FieldChange]) -> str:
    add = sum(1 for c in changes if c.before is None)
    rem = sum(1 for c in changes if c.after is None)
    mod = len(changes) - add - rem
    return f"+{add} -{rem} ~{mod}"


def _reason(changes: list[FieldChange], what: str) -> str:
    parts = []
    if any(c.path == "metadata.managed" for c in changes):
        parts.append(f"unmarked {what} named by a manifest: adopt")
    groups: dict[str, list] = {}
    for c in changes:
        if c.path == "metadata.managed":
            continue
        top = c.path.split("[")[0]
        groups.setdefault(top, []).append(c)
    for top, cs in groups.items():
        if "[" in cs[0].path:
            parts.append(f"{top.removeprefix('spec.')} differ ({_count(cs)})")
        elif top == "spec.password":
            parts.append("password source changed")
        else:
            parts.append(f"{top.removeprefix('spec.').removeprefix('metadata.')} differs")
    return "; ".join(parts)


def _missing_needs(ctx: PlanContext, ids: Iterable[ResourceId]) -> tuple:
    """Referenced objects that do not exist yet: they must be created (successfully) first."""
    return tuple(i for i in ids if i not in ctx.objects)


# --------------------------------------------------------------------------- MqttRole

def topic_acls(ctx: PlanContext, role: str) -> list[dict]:
    """The ACLs the declared (present) Topics give `role`, from one index built per plan:
    scanning every Topic for every role was quadratic (2.4 s at 200 roles and 1,000 Topics)."""
    index = ctx.memo.get("topic_acls")
    if index is None:
        index = {}
        for rid, t in sorted(ctx.desired.items(), key=lambda kv: (kv[0].kind, kv[0].name)):
            if rid.kind != "Topic" or t.spec.get("state", "present") != "present":
                continue
            topic = rid.name
            for r in t.spec.get("publishers", ()):
                index.setdefault(r, []).append({"type": "publishClientSend", "topic": topic, "allow": True, "priority": 0})
            kind = "subscribePattern" if has_wildcards(topic) else "subscribeLiteral"
            for r in t.spec.get("subscribers", ()):
                index.setdefault(r, []).append({"type": kind, "topic": topic, "allow": True, "priority": 0})
        ctx.memo["topic_acls"] = index
    return list(index.get(role, ()))


def effective_acls(r: Resource, ctx: PlanContext) -> list[dict] | None:
    """A role's own ACLs merged with its Topics'; None when neither is declared (ACLs left alone)."""
    from_topics = topic_acls(ctx, r.id.name)
    if "acls" not in r.declared and not from_topics:
        return None
    merged = {acl_key(a): a for a in from_topics}
    merged.update({acl_key(a): a for a in r.spec.get("acls", ())})
    return sort_acls(merged.values())


class MqttRoleRules:
    kind = "MqttRole"
    target = "mqtt"
    prunable = True
    to_manifest = staticmethod(lambda live, ctx: _role_to_manifest(live, ctx))

    @staticmethod
    def check(name: str, spec: dict):
        out = []
        seen: dict[tuple, int] = {}
        for i, a in enumerate(spec.get("acls", [])):
            problem = topic_problem(a.get("topic"))
            if problem:
                out.append((("spec", "acls", i, "topic"), problem))
            k = (a.get("type"), a.get("topic"))
            if k in seen:
                out.append((("spec", "acls", i), f"duplicate ACL {k[0]} {k[1]!r} (first at index {seen[k]})"))
            seen.setdefault(k, i)
        return out

    @staticmethod
    def normalise(spec: dict) -> dict:
        return {"description": _text(spec, "description"), "textName": _text(spec, "textName"),
                "acls": sort_acls(_norm_acl(a) for a in spec.get("acls", []))}

    @staticmethod
    def references(spec: dict):
        return []

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        acls = effective_acls(r, ctx)
        want = r
        if acls is not None:
            want = replace(r, spec={**r.spec, "acls": acls}, declared=r.declared | {"acls"})
        if live is None:
            changes = [FieldChange(f"spec.{f}", None, r.spec[f]) for f in ("description", "textName")
                       if f in r.declared and r.spec[f] is not None]
            changes += keyed_changes("acls", [], acls or [], acl_key, " ".join)
            return [Action("create", r.id, "role does not exist", tuple(changes), desired=want)]
        changes = _common_changes(want, live, ("description", "textName"), ctx)
        if acls is not None:
            changes += keyed_changes("acls", live.spec.get("acls", []), acls, acl_key, " ".join)
        if changes:
            return [Action("update", r.id, _reason(changes, "role"), tuple(changes), desired=want, live=live)]
        return [_noop(want, live, "acls, description and labels match" if acls is not None
                      else "description and labels match")]


# --------------------------------------------------------------------------- MqttGroup

class MqttGroupRules:
    kind = "MqttGroup"
    target = "mqtt"
    prunable = True
    to_manifest = staticmethod(lambda live, ctx: _group_to_manifest(live, ctx))
    export_needs = staticmethod(lambda live, ctx: _member_needs(live, ctx))

    @staticmethod
    def check(name: str, spec: dict):
        return _dup_names(spec.get("roles", []), ("spec", "roles"))

    @staticmethod
    def normalise(spec: dict) -> dict:
        return {"description": _text(spec, "description"), "textName": _text(spec, "textName"),
                "roles": _norm_refs(spec.get("roles", []))}

    @staticmethod
    def references(spec: dict):
        for i, ref in enumerate(spec.get("roles", [])):
            yield ("MqttRole", ref["name"], ("spec", "roles", i, "name"))

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        d = r.spec
        if live is None:
            changes = [FieldChange(f"spec.{f}", None, d[f]) for f in ("description", "textName")
                       if f in r.declared and d[f] is not None]
            changes += _ref_changes("roles", [], d["roles"])
            needs = _missing_needs(ctx, (ResourceId("MqttRole", x["name"]) for x in d["roles"]))
            return [Action("create", r.id, "group does not exist", tuple(changes), desired=r, needs=needs)]
        changes = _common_changes(r, live, ("description", "textName"), ctx)
        if "roles" in r.declared:
            changes += _ref_changes("roles", live.spec.get("roles"), d["roles"])
        if changes:
            needs = _missing_needs(ctx, (ResourceId("MqttRole", x["name"]) for x in d["roles"]))
            return [Action("update", r.id, _reason(changes, "group"), tuple(changes), desired=r, live=live,
                           needs=needs)]
        return [_noop(r, live, "roles, description and labels match")]

    @staticmethod
    def keep(live: Live) -> str | None:
        """Why --prune must keep this live group although no manifest declares it, or None."""
        return ANONYMOUS_GROUP_KEPT if live.facts.get("anonymous") else None


# --------------------------------------------------------------------------- MqttClient

class MqttClientRules:
    kind = "MqttClient"
    target = "mqtt"
    prunable = True
    to_manifest = staticmethod(lambda live, ctx: _client_to_manifest(live, ctx))
    export_needs = staticmethod(lambda live, ctx: _member_needs(live, ctx))

    @staticmethod
    def check(name: str, spec: dict):
        out = _dup_names(spec.get("roles", []), ("spec", "roles"))
        out += _dup_names(spec.get("groups", []), ("spec", "groups"))
        src = spec.get("password")
        # A relative fromFile path is read next to the manifest (resolve_paths), so only absolute
        # paths and variables can be checked here; the others are read, and reported, by normalise.
        if isinstance(src, dict) and ("fromEnv" in src or os.path.isabs(src.get("fromFile", ""))):
            try:
                read_secret(src)
            except ManifestError as e:
                out.append((("spec", "password"), e.message))
        return out

    @staticmethod
    def resolve_paths(spec: dict, base: str) -> dict:
        """A relative fromFile path means next to the manifest file, like every path in a manifest."""
        src = spec.get("password")
        if isinstance(src, dict) and isinstance(src.get("fromFile"), str) and not os.path.isabs(src["fromFile"]):
            return {**spec, "password": {"fromFile": os.path.normpath(os.path.join(base, src["fromFile"]))}}
        return spec

    @staticmethod
    def normalise(spec: dict) -> dict:
        """Reads the password source now (validate names a missing one) and keeps the value in a
        Secret, which prints as `<secret from ...>` and never as its value."""
        src = spec.get("password")
        password = None
        if isinstance(src, dict):
            password = Secret(read_secret(src), describe(src))
        return {"password": password, "clientId": spec.get("clientId"),
                "description": _text(spec, "description"), "textName": _text(spec, "textName"),
                "roles": _norm_refs(spec.get("roles", [])), "groups": _norm_refs(spec.get("groups", [])),
                "disabled": spec.get("disabled", False)}

    @staticmethod
    def references(spec: dict):
        for i, ref in enumerate(spec.get("roles", [])):
            yield ("MqttRole", ref["name"], ("spec", "roles", i, "name"))
        for i, ref in enumerate(spec.get("groups", [])):
            yield ("MqttGroup", ref["name"], ("spec", "groups", i, "name"))

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        d = r.spec
        refs = [ResourceId("MqttRole", x["name"]) for x in d["roles"]]
        refs += [ResourceId("MqttGroup", x["name"]) for x in d["groups"]]
        needs = _missing_needs(ctx, refs)
        if live is None:
            changes = [FieldChange(f"spec.{f}", None, d[f]) for f in ("clientId", "description", "textName")
                       if f in r.declared and d[f] is not None]
            if d["password"] is not None:
                changes.append(FieldChange("spec.password", None, None, secret=True))
            changes += _ref_changes("roles", [], d["roles"]) + _ref_changes("groups", [], d["groups"])
            if d["disabled"]:
                changes.append(FieldChange("spec.disabled", None, True))
            return [Action("create", r.id, "client does not exist", tuple(changes), desired=r, needs=needs)]
        changes = _common_changes(r, live, ("clientId", "description", "textName"), ctx)
        if d["disabled"] != live.spec.get("disabled", False):
            changes.append(FieldChange("spec.disabled", live.spec.get("disabled", False), d["disabled"]))
        password_why = None
        if d["password"] is not None:
            if live.facts.get("login") == "accepted":
                # The broker accepts the declared password: in sync, whatever our fingerprint says. The
                # login answers first because it is the broker's own word and because the fingerprint
                # check (PBKDF2, ~0.6 ms) costs as much per client as the login already made.
                pass
            elif not verify(d["password"].reveal(), live.facts.get("fingerprint")):
                password_why = "password source changed" if live.facts.get("fingerprint") \
                    else "password not set by reconciler"
            elif live.facts.get("login") == "refused":
                password_why = "password changed on the broker (a login with the declared one is refused)"
            if password_why:
                changes.append(FieldChange("spec.password", None, None, secret=True))
        if "roles" in r.declared:
            changes += _ref_changes("roles", live.spec.get("roles"), d["roles"])
        if "groups" in r.declared:
            changes += _ref_changes("groups", live.spec.get("groups"), d["groups"])
        if changes:
            reason = _reason(changes, "client")
            if password_why:
                reason = reason.replace("password source changed", password_why)
            return [Action("update", r.id, reason, tuple(changes), desired=r, live=live, needs=needs)]
        if d["password"] is None:
            return [_noop(r, live, "roles, groups and labels match")]
        if live.facts.get("login") == "accepted":
            return [_noop(r, live, "password (a test login was accepted), roles, groups and labels match")]
        untested = live.facts.get("login_untested")
        return [_noop(r, live, "password fingerprint, roles, groups and labels match"
                      + (f" (password not tested by a login: {untested})" if untested else ""))]


# --------------------------------------------------------------------------- Topic

class TopicRules:
    kind = "Topic"
    target = "mqtt"
    prunable = True
    to_manifest = staticmethod(lambda live, ctx: _topic_to_manifest(live, ctx))
    show = staticmethod(lambda path, value: _show_topic(path, value))

    @staticmethod
    def check(name: str, spec: dict):
        problem = topic_problem(name)
        if problem:
            return [(("metadata", "name"), problem)]
        out = []
        if spec.get("retained") is not None:
            if has_wildcards(name):
                out.append((("spec", "retained"), "a topic with wildcards (+ or #) cannot carry a retained message"))
            elif name.startswith("$"):
                out.append((("spec", "retained"), "topics starting with $ belong to the broker and cannot carry "
                                                  "a retained message"))
        return out

    @staticmethod
    def normalise(spec: dict) -> dict:
        retained = None
        ret = spec.get("retained")
        if ret is not None:
            if "json" in ret:
                payload = json.dumps(ret["json"], separators=(",", ":"), ensure_ascii=False, sort_keys=False)
                retained = {"payload": payload, "qos": ret.get("qos", 1), "format": "json"}
            else:
                retained = {"payload": ret["payload"], "qos": ret.get("qos", 1), "format": "text"}
        return {"retained": retained, "publishers": sorted(spec.get("publishers", [])),
                "subscribers": sorted(spec.get("subscribers", [])), "state": spec.get("state", "present")}

    @staticmethod
    def references(spec: dict):
        for f in ("publishers", "subscribers"):
            for i, role in enumerate(spec.get(f, [])):
                yield ("MqttRole", role, ("spec", f, i))

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        d = r.spec
        want = d["retained"]
        if d["state"] == "absent":
            if live is None:
                return [_noop(r, None, "no retained message, as declared")]
            return [Action("delete", r.id, "state: absent: clear the retained message",
                           (FieldChange("spec.retained.payload", live.spec["retained"].get("payload"), None),),
                           desired=r, live=live)]
        if want is None:
            if live is not None and live.managed:
                return [Action("delete", r.id, "retained message no longer declared: clear it",
                               (FieldChange("spec.retained.payload", live.spec["retained"].get("payload"), None),),
                               desired=r, live=live)]
            return [_noop(r, live, "no retained message declared")]
        if live is None:
            return [Action("create", r.id, "no retained message",
                           (FieldChange("spec.retained.payload", None, want["payload"]),
                            FieldChange("spec.retained.qos", None, want["qos"])), desired=r)]
        have = live.spec.get("retained") or {}
        changes = _ownership_changes(live, ctx)
        if not payload_matches(want, have.get("payload")):
            changes.append(FieldChange("spec.retained.payload", have.get("payload"), want["payload"]))
        if have.get("qos") != want["qos"]:
            changes.append(FieldChange("spec.retained.qos", have.get("qos"), want["qos"]))
        if dict(r.labels) != dict(live.labels):
            changes.append(FieldChange("metadata.labels", dict(live.labels), dict(r.labels)))
        if changes:
            return [Action("update", r.id, _reason(changes, "retained message"), tuple(changes),
                           desired=r, live=live)]
        return [_noop(r, live, "retained message matches")]


def payload_matches(want: dict, have: str | None) -> bool:
    """Byte-equal, or for a `json:` payload, equal as JSON (a device's spacing is not drift)."""
    if have is None:
        return False
    if have == want["payload"]:
        return True
    if want.get("format") == "json":
        try:
            return json.loads(have) == json.loads(want["payload"])
        except ValueError:
            return False
    return False


# --------------------------------------------------------------------------- MqttDefaults

class MqttDefaultsRules:
    """dynsec's broker-wide defaults: the ACL access of a client no ACL speaks for, and the group
    whose roles anonymous clients get. One per broker; no marker (the broker has nowhere to keep
    one), so it is never created, deleted, pruned or adopted: only its declared fields are set."""
    kind = "MqttDefaults"
    target = "mqtt"
    prunable = False

    @staticmethod
    def check(name: str, spec: dict):
        if name != DEFAULTS_NAME:
            return [(("metadata", "name"), f"a broker has one MqttDefaults: name it {DEFAULTS_NAME!r}, "
                                           f"not {name!r}")]
        return []

    @staticmethod
    def normalise(spec: dict) -> dict:
        return {"aclAccess": {k: v for k, v in (spec.get("aclAccess") or {}).items()},
                "anonymousGroup": spec.get("anonymousGroup")}

    @staticmethod
    def references(spec: dict):
        if spec.get("anonymousGroup"):
            yield ("MqttGroup", spec["anonymousGroup"], ("spec", "anonymousGroup"))

    @staticmethod
    def classify(r: Resource, live: Live | None, ctx: PlanContext) -> list[Action]:
        have = live.spec if live is not None else {}
        have_access = have.get("aclAccess") or {}
        changes = [FieldChange(f"spec.aclAccess.{k}", have_access.get(k), v)
                   for k, v in sorted(r.spec["aclAccess"].items()) if have_access.get(k) != v]
        want, now = r.spec["anonymousGroup"], have.get("anonymousGroup") or ""
        refused, needs = None, ()
        if want is not None and want != now:
            changes.append(FieldChange("spec.anonymousGroup", now, want))
            if want == "":
                # Mosquitto 2.0 (2.0.11 to 2.0.18) answers setAnonymousGroup "" with "Group not found".
                refused = (f"the broker's anonymous group is {now!r} and Mosquitto 2.0 cannot unset it "
                           "(setAnonymousGroup \"\" is refused): declare a group without roles as "
                           "anonymousGroup, or set allow_anonymous false in mosquitto.conf")
            else:
                needs = _missing_needs(ctx, (ResourceId("MqttGroup", want),))
        if not changes:
            return [_noop(r, live, "declared broker defaults match")]
        what = ", ".join(c.path.removeprefix("spec.") for c in changes)
        return [Action("update", r.id, f"broker defaults differ: {what}", tuple(changes), desired=r, live=live,
                       refused=refused, needs=needs)]

    @staticmethod
    def to_manifest(live: Live, ctx):
        """Exported with --all only (it carries no marker): what the broker has, the group by name."""
        from .exporting import Doc
        spec: dict[str, Any] = {"aclAccess": dict(live.spec.get("aclAccess") or {})}
        if live.spec.get("anonymousGroup"):
            spec["anonymousGroup"] = live.spec["anonymousGroup"]
        return Doc(live.id.kind, live.id.name, spec, {},
                   ["the broker's defaults: applying this sets them (they are never pruned)"])

    @staticmethod
    def export_needs(live: Live, ctx) -> list[ResourceId]:
        group = live.spec.get("anonymousGroup")
        return [ResourceId("MqttGroup", group)] if group else []


# --------------------------------------------------------------------------- export (to_manifest)

PASSWORD_PLACEHOLDER = "__reconciler_password_placeholder__"


def password_env(client: str) -> str:
    """The placeholder variable of an exported client's password: sensor-01 -> MQTT_PASSWORD_SENSOR_01."""
    import re
    return "MQTT_PASSWORD_" + re.sub(r"[^A-Za-z0-9]", "_", client).upper()


def _text_fields(s: dict, spec: dict) -> None:
    if s.get("description"):
        spec["description"] = s["description"]
    if s.get("textName"):
        spec["textName"] = s["textName"]


def _member_refs(items) -> list[dict]:
    """Role or group references as a manifest writes them: the default priority left out."""
    out = []
    for r in items or ():
        e = {"name": r["name"]}
        if r.get("priority", DEFAULT_MEMBER_PRIORITY) != DEFAULT_MEMBER_PRIORITY:
            e["priority"] = r["priority"]
        out.append(e)
    return out


def _mqtt_doc(live: Live, spec: dict):
    from .exporting import Doc, unmanaged_comment
    return Doc(live.id.kind, live.id.name, spec, dict(live.labels), unmanaged_comment(live))


def _role_to_manifest(live: Live, ctx):
    spec: dict[str, Any] = {}
    _text_fields(live.spec, spec)
    spec["acls"] = [{"type": a["type"], "topic": a["topic"], "allow": a["allow"], "priority": a["priority"]}
                    for a in live.spec.get("acls") or ()]
    return _mqtt_doc(live, spec)


def _group_to_manifest(live: Live, ctx):
    spec: dict[str, Any] = {}
    _text_fields(live.spec, spec)
    spec["roles"] = _member_refs(live.spec.get("roles"))
    return _mqtt_doc(live, spec)


def _client_to_manifest(live: Live, ctx):
    s = live.spec
    # Secrets are never read back: a placeholder the renderer turns into a fromEnv line.
    spec: dict[str, Any] = {"password": PASSWORD_PLACEHOLDER}
    if s.get("clientId"):
        spec["clientId"] = s["clientId"]
    _text_fields(s, spec)
    spec["roles"] = _member_refs(s.get("roles"))
    spec["groups"] = _member_refs(s.get("groups"))
    if s.get("disabled"):
        spec["disabled"] = True
    doc = _mqtt_doc(live, spec)
    doc.password = (password_env(live.id.name), bool(live.managed and live.facts.get("fingerprint")))
    return doc


def _topic_to_manifest(live: Live, ctx):
    from .exporting import Doc
    r = live.spec.get("retained") or {}
    if live.facts.get("binary") or r.get("payload") is None:
        ctx.notes.append(f"{live.id} skipped: its retained message is binary, a manifest holds text")
        return None
    if live.id.name.startswith("$"):
        return None
    doc = Doc("Topic", live.id.name, {"retained": {"payload": r["payload"], "qos": r.get("qos", 1)}}, dict(live.labels))
    if not live.managed:
        doc.comments.append("retained message not published by the reconciler: applying this adopts it")
    return doc


def _member_needs(live: Live, ctx) -> list[ResourceId]:
    """A group or client needs the roles (and groups) it names: a reference must resolve."""
    out = [ResourceId("MqttRole", r["name"]) for r in live.spec.get("roles") or ()]
    out += [ResourceId("MqttGroup", g["name"]) for g in live.spec.get("groups") or ()]
    return out


def _show_topic(path: str, value: Any) -> Any:
    """A retained message as a manifest writes it: its internal `format` (how json: was encoded) left out."""
    if path == "spec.retained" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k != "format"}
    return value
