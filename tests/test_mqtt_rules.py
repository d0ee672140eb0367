"""The pure side of the MQTT kinds: topic rules, secrets and fingerprints, the ownership marker, and
the classify decisions that need a secret (which the data-driven cases cannot hold). No broker."""
from __future__ import annotations

import json
import pickle

import pytest
import yaml

from reconciler import manifests, planner
from reconciler.errors import ManifestError, TargetError
from reconciler.kinds.mqtt import has_wildcards, topic_problem
from reconciler.model import Live, Options, ResourceId, Snapshot
from reconciler.providers.mosquitto import MosquittoProvider
from reconciler.providers.mosquitto import marker
from reconciler.secrets import Secret, fingerprint, read_secret, verify


def parse(kind: str, name: str, spec: dict, file="m.yaml", labels=None):
    meta = {"name": name}
    if labels:
        meta["labels"] = labels
    d = {"apiVersion": "reconciler/v1", "kind": kind, "metadata": meta, "spec": spec}
    return manifests.parse_document(d, file)


@pytest.mark.parametrize("topic", ["a", "a/b/c", "+", "#", "a/+/c", "a/#", "/", "a//b", "ü/ñ", "$SYS/#",
                                   "x" * 65535])
def test_valid_topics(topic):
    assert topic_problem(topic) is None


@pytest.mark.parametrize("topic,why", [
    ("", "non-empty"), ("a/b+/c", "'+' must be a whole level"), ("a/#/c", "only be the last"),
    ("a/b#", "'#' must be a whole level"), ("a\0b", "NUL"), ("a\x07", "control character"),
    ("x" * 65536, "at most 65535 bytes"), ("é" * 40000, "at most 65535 bytes"), ("\ud800", "UTF-8"),
])
def test_invalid_topics(topic, why):
    assert why in topic_problem(topic)


def test_wildcards():
    assert has_wildcards("a/+/b") and has_wildcards("#") and not has_wildcards("a/b+c")


def test_topic_checks_in_manifests():
    with pytest.raises(ManifestError, match="wildcards"):
        parse("Topic", "edge/+/config", {"retained": {"payload": "x"}})
    with pytest.raises(ManifestError, match="whole level"):
        parse("Topic", "edge/gw+/config", {})
    with pytest.raises(ManifestError, match=r"belong to the broker"):
        parse("Topic", "$SYS/x", {"retained": {"payload": "x"}})
    with pytest.raises(ManifestError, match="duplicate ACL") as e:
        parse("MqttRole", "r", {"acls": [{"type": "publishClientSend", "topic": "a"},
                                         {"type": "publishClientSend", "topic": "a", "allow": False}]})
    assert "m.yaml:" in str(e.value) and "MqttRole 'r'" in str(e.value)
    with pytest.raises(ManifestError, match="listed twice"):
        parse("MqttGroup", "g", {"roles": [{"name": "a"}, {"name": "a", "priority": 2}]})
    # The schema refuses a literal password and never quotes it.
    with pytest.raises(ManifestError) as e:
        parse("MqttClient", "c", {"password": "hunter2-literal"})
    assert "literal" in str(e.value) and "hunter2-literal" not in str(e.value)


def test_normalise_fills_defaults_and_compacts_json():
    t = parse("Topic", "a/b", {"retained": {"json": {"interval": 30, "list": [1, 2]}}})
    assert t.spec["retained"] == {"payload": '{"interval":30,"list":[1,2]}', "qos": 1, "format": "json"}
    assert t.spec["state"] == "present"
    r = parse("MqttRole", "r", {"acls": [{"type": "subscribePattern", "topic": "b/#"},
                                         {"type": "publishClientSend", "topic": "a", "allow": False}]})
    assert r.spec["acls"] == [{"type": "publishClientSend", "topic": "a", "allow": False, "priority": 0},
                              {"type": "subscribePattern", "topic": "b/#", "allow": True, "priority": 0}]


# --------------------------------------------------------------------------- secrets

def test_secret_never_shows_its_value():
    s = Secret("hunter2-value", "environment variable X")
    for shown in (repr(s), str(s), f"{s}", f"{s!r}", repr({"password": s}), repr([s])):
        assert "hunter2-value" not in shown and "environment variable X" in shown
    with pytest.raises(TypeError):
        json.dumps({"password": s})
    assert s.reveal() == "hunter2-value"
    assert pickle.loads(pickle.dumps(s)) == s
    assert s == Secret("hunter2-value", "elsewhere") and s != Secret("other", "environment variable X")


def test_read_secret_errors_name_the_source_never_a_value(tmp_path, monkeypatch):
    monkeypatch.delenv("RECON_TEST_UNSET", raising=False)
    with pytest.raises(ManifestError, match="environment variable RECON_TEST_UNSET is not set"):
        read_secret({"fromEnv": "RECON_TEST_UNSET"})
    monkeypatch.setenv("RECON_TEST_EMPTY", "")
    with pytest.raises(ManifestError, match="RECON_TEST_EMPTY is empty"):
        read_secret({"fromEnv": "RECON_TEST_EMPTY"})
    missing = tmp_path / "nope"
    with pytest.raises(ManifestError, match=f"secret file {missing} cannot be read"):
        read_secret({"fromFile": str(missing)})
    f = tmp_path / "pw"
    f.write_text("value-1\n")
    assert read_secret({"fromFile": str(f)}) == "value-1"
    f.write_text("\n")
    with pytest.raises(ManifestError, match="is empty"):
        read_secret({"fromFile": str(f)})


def test_relative_secret_file_is_read_next_to_the_manifest(tmp_path, monkeypatch):
    (tmp_path / "m").mkdir()
    (tmp_path / "m" / "pw").write_text("next-to-manifest")
    monkeypatch.chdir("/")
    r = parse("MqttClient", "c", {"password": {"fromFile": "pw"}}, file=str(tmp_path / "m" / "c.yaml"))
    assert r.spec["password"].reveal() == "next-to-manifest"


def test_missing_env_is_a_validation_error_with_file_and_line(monkeypatch):
    monkeypatch.delenv("RECON_TEST_MISSING", raising=False)
    with pytest.raises(ManifestError) as e:
        parse("MqttClient", "c", {"password": {"fromEnv": "RECON_TEST_MISSING"}})
    assert str(e.value).startswith("m.yaml:") and "RECON_TEST_MISSING" in str(e.value)


def test_fingerprint_is_salted_and_verifies():
    a, b = fingerprint("pw-1"), fingerprint("pw-1")
    assert a != b and a.startswith("pbkdf2-sha256$") and "pw-1" not in a
    assert verify("pw-1", a) and verify("pw-1", b) and not verify("pw-2", a)
    for bad in (None, "", "garbage", "md5$1$a$b", "pbkdf2-sha256$5$AA==$AA==", "pbkdf2-sha256$x$y$z"):
        assert not verify("pw-1", bad)


# --------------------------------------------------------------------------- marker

@pytest.mark.parametrize("description", [None, "one line", "two\nlines", "ends with newline\n",
                                         "reconciler:v1 looks like a marker but is not last\nx"])
def test_marker_keeps_the_users_description(description):
    text = marker.encode(description, {"labels": {"a": "b"}, "pw": "pbkdf2-sha256$1$a$b"})
    got, mark = marker.decode(text)
    assert got == (description or None) and mark == {"labels": {"a": "b"}, "pw": "pbkdf2-sha256$1$a$b"}


def test_unmarked_text_is_all_description():
    assert marker.decode("hand made") == ("hand made", None)
    assert marker.decode("x\nreconciler:v1 {not json") == ("x\nreconciler:v1 {not json", None)
    assert marker.decode(None) == (None, None)


def test_user_properties_round_trip():
    props = marker.user_properties({"site": "p3"}, "edge")
    assert marker.read_properties(props) == (True, {"site": "p3"}, "edge")
    assert marker.read_properties([("other", "x")]) == (False, {}, "default")


# --------------------------------------------------------------------------- classify with secrets

def _client_plan(monkeypatch, value: str, fp: str | None, managed=True):
    monkeypatch.setenv("RECON_TEST_PW", value)
    r = parse("MqttClient", "c", {"password": {"fromEnv": "RECON_TEST_PW"}})
    facts = {"fingerprint": fp} if fp else {}
    live = Live(ResourceId("MqttClient", "c"), {"roles": [], "groups": [], "disabled": False, "clientId": None},
                {}, managed, facts)
    return planner.plan([r], Snapshot({live.id: live}), Options())


def test_unchanged_password_is_not_resent(monkeypatch):
    p = _client_plan(monkeypatch, "pw-1", fingerprint("pw-1"))
    assert p.actions == () and "password" in p.unchanged[0].reason


def test_changed_password_is_one_write_only_change(monkeypatch):
    p = _client_plan(monkeypatch, "pw-2", fingerprint("pw-1"))
    (a,) = p.actions
    assert a.verb == "update" and a.fields == ["spec.password"] and a.reason == "password source changed"
    c = a.changes[0]
    assert c.secret and c.before is None and c.after is None
    assert "pw-2" not in repr(p)


def test_adopted_client_gets_its_password_set_once(monkeypatch):
    p = _client_plan(monkeypatch, "pw-1", None, managed=False)
    (a,) = p.actions
    assert a.fields == ["metadata.managed", "spec.password"]
    assert "password not set by reconciler" in a.reason


def test_a_login_the_broker_accepts_settles_the_password_without_a_fingerprint(monkeypatch):
    """Set by hand to the declared value (no fingerprint of ours): the accepted login is the proof."""
    monkeypatch.setenv("RECON_TEST_PW", "pw-1")
    r = parse("MqttClient", "c", {"password": {"fromEnv": "RECON_TEST_PW"}})
    live = Live(ResourceId("MqttClient", "c"), {"roles": [], "groups": [], "disabled": False, "clientId": None},
                {}, True, {"fingerprint": fingerprint("pw-0"), "login": "accepted"})
    p = planner.plan([r], Snapshot({live.id: live}), Options())
    assert p.actions == () and len(p.unchanged) == 1
    refused = Live(live.id, live.spec, {}, True, {"fingerprint": fingerprint("pw-1"), "login": "refused"})
    (a,) = planner.plan([r], Snapshot({live.id: refused}), Options()).actions
    assert a.fields == ["spec.password"] and "refused" in a.reason


# --------------------------------------------------------------------------- provider without a broker

def test_constructing_the_provider_does_not_connect():
    p = MosquittoProvider("mqtt://127.0.0.1:1", "admin", "x")
    assert p.target() == "mqtt://127.0.0.1:1" and "x'" not in repr(p)
    p.close()


@pytest.mark.parametrize("url", ["http://h:1", "mqtt://", "mqtt://h:notaport", "h:1883"])
def test_bad_broker_urls(url):
    with pytest.raises(TargetError, match="broker URL"):
        MosquittoProvider(url, "admin", "x")
