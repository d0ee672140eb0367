"""Hostile input: every bad manifest ends the run with exit 1 and one sentence naming the file, the line
and (where it is known) the kind and name; never a traceback, and never a change to live state.

The cases are data: tests/bad_input/*.yaml, one small file per case. Each opens with comments:
    # expect: TEXT     the error must contain TEXT (repeatable)
    # secret: VALUE    VALUE must appear nowhere in the output
and the line the error must name ends with `#<-`. `{P}` stands for the test's unique prefix.
Each case sits next to a valid manifest declaring a pool and a VM, and is applied against the real
qemu:///system: if validation were not all-or-nothing, those would be created."""
from __future__ import annotations

import os
import re
import resource
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, cli, doc, write
from mqtt_fixtures import mq  # noqa: F401  (a fixture)
from test_adversarial_support import live_state
from reconciler import manifests as manifest

BAD = Path(__file__).with_name("bad_input")
CASES = sorted(p.stem for p in BAD.glob("*.yaml"))
# The broker of a run that (wrongly) got as far as connecting: a closed port, so the error would differ.
NO_BROKER = {"RECONCILER_MQTT_URL": "mqtt://127.0.0.1:9", "RECONCILER_MQTT_USERNAME": "admin",
             "RECONCILER_MQTT_PASSWORD": "adversarial-admin-pw"}


def good_docs(prefix: str, pool_dir: str) -> list[dict]:
    return [doc("StoragePool", f"{prefix}okpool", {"type": "dir", "path": pool_dir}),
            doc("VirtualMachine", f"{prefix}okvm", {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1,
                                                     "state": "shutoff"})]


def assert_one_clear_error(run, file: Path | None, line: int | None = None, expect=(), secrets=()) -> None:
    assert run.code == 1, f"exit {run.code}\n{run.out}\n{run.err}"
    assert "Traceback" not in run.err and "Traceback" not in run.out, run.err
    lines = [l for l in run.err.splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), run.err
    msg = lines[0]
    if file is not None:
        if line is not None:
            assert f"{file}:{line}:" in msg, f"expected {file}:{line}: in {msg!r}"
        else:
            assert str(file) in msg, msg
    for text in expect:
        assert text in msg, f"{text!r} not in {msg!r}"
    for s in secrets:
        assert s not in run.out + run.err, "a secret appeared in the output"
    assert "changed:" not in run.out


def load_case(name: str, prefix: str) -> tuple[str, list[str], list[str], int | None]:
    text = (BAD / f"{name}.yaml").read_text().replace("{P}", prefix)
    expect = [m.group(1) for m in re.finditer(r"^# expect: (.*)$", text, re.M)]
    secrets = [m.group(1) for m in re.finditer(r"^# secret: (.*)$", text, re.M)]
    marked = [i + 1 for i, l in enumerate(text.splitlines()) if l.rstrip().endswith("#<-")]
    return text, expect, secrets, (marked[0] if marked else None)


@pytest.mark.libvirt
@pytest.mark.parametrize("case", CASES)
def test_bad_manifest_is_refused_whole_with_one_clear_message(case, prefix, pool_dir, tmp_path, qemu_uri):
    text, expect, secrets, line = load_case(case, prefix)
    d = tmp_path / "m"
    write(d / "a-good.yaml", *good_docs(prefix, pool_dir))
    bad = d / "case.yaml"
    bad.write_text(text)
    before = live_state(qemu_uri, prefix)

    v = cli("validate", str(d), env=NO_BROKER)
    assert_one_clear_error(v, bad, line, expect, secrets)
    a = cli("apply", str(d), "--libvirt-uri", qemu_uri, env=NO_BROKER)
    assert_one_clear_error(a, bad, line, expect, secrets)
    assert a.err == v.err, "apply and validate must report the same error"

    assert live_state(qemu_uri, prefix) == before == {"domains": {}, "storage": {}}
    assert not os.path.exists(pool_dir)
    assert not os.path.exists("/tmp/reconciler-adversarial-pwned")


# --------------------------------------------------------------------------- byte-level garbage

def _bytes_cases(prefix: str) -> dict[str, tuple[bytes, str, int | None]]:
    vm = (f"apiVersion: reconciler/v1\nkind: VirtualMachine\nmetadata: {{name: {prefix}vm}}\n"
          f"spec: {{memory: 64MiB, vcpus: 1}}\n").encode()
    return {
        "nul-byte": (vm + b"description: a\0b\n", "binary content (NUL byte)", None),
        "elf-binary": (b"\x7fELF\x02\x01\x01\0\0\0" + bytes(range(256)) * 4, "binary content", None),
        "invalid-utf8": (vm.replace(b"64MiB", b"64MiB\n# caf\xe9\n", 1), "not valid UTF-8", 5),
        "utf16": ("apiVersion: reconciler/v1\n".encode("utf-16"), "binary content", None),
        "truncated-utf8": (vm + b"# \xe2\x82", "not valid UTF-8", 5),
    }


@pytest.mark.libvirt
@pytest.mark.parametrize("case", ["nul-byte", "elf-binary", "invalid-utf8", "utf16", "truncated-utf8"])
def test_binary_and_invalid_utf8_are_refused(case, prefix, pool_dir, tmp_path, qemu_uri):
    data, expect, line = _bytes_cases(prefix)[case]
    d = tmp_path / "m"
    write(d / "a-good.yaml", *good_docs(prefix, pool_dir))
    bad = d / "case.yaml"
    bad.write_bytes(data)
    a = cli("apply", str(d), "--libvirt-uri", qemu_uri, env=NO_BROKER)
    assert_one_clear_error(a, bad, line, [expect])
    assert live_state(qemu_uri, prefix) == {"domains": {}, "storage": {}}


@pytest.mark.libvirt
def test_same_kind_and_name_in_two_files_names_both_places(prefix, pool_dir, tmp_path, qemu_uri):
    d = tmp_path / "m"
    vm = doc("VirtualMachine", f"{prefix}vm", {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": "shutoff"})
    first = write(d / "a.yaml", *good_docs(prefix, pool_dir), vm)
    second = write(d / "sub" / "b.yaml", vm)
    a = cli("apply", str(d), "--libvirt-uri", qemu_uri)
    assert_one_clear_error(a, second, 1, ["declared twice", f"first at {first}:", f"VirtualMachine '{prefix}vm'"])
    assert live_state(qemu_uri, prefix) == {"domains": {}, "storage": {}}


def test_missing_path_is_one_clear_error(tmp_path):
    run = cli("validate", str(tmp_path / "nowhere"))
    assert_one_clear_error(run, tmp_path / "nowhere", None, ["no such file or directory"])


def test_dangling_symlink_and_unreadable_file_are_one_clear_error(tmp_path):
    link = tmp_path / "gone.yaml"
    link.symlink_to(tmp_path / "target-that-does-not-exist.yaml")
    assert_one_clear_error(cli("validate", str(link)), link, None, ["no such file or directory"])
    # /proc/self/mem exists but cannot be read from offset 0 (EIO), even by root.
    run = cli("validate", "/proc/self/mem")
    assert_one_clear_error(run, Path("/proc/self/mem"), None, ["cannot read"])


# --------------------------------------------------------------------------- size limits

def test_file_over_the_size_limit_is_refused_before_it_is_read(tmp_path):
    f = tmp_path / "huge.yaml"
    with open(f, "wb") as h:
        h.write(b"# filler\n")
        h.truncate(manifest.MAX_FILE_BYTES + 1)  # sparse: the limit is checked on the size, not by reading
    run = cli("validate", str(f))
    assert_one_clear_error(run, f, None, [f"over the limit of {manifest.MAX_FILE_BYTES}"])


def test_file_just_under_the_size_limit_is_read(tmp_path):
    f = tmp_path / "big.yaml"
    body = b"apiVersion: reconciler/v1\nkind: VirtualMachine\nmetadata: {name: big}\nspec: {memory: 64MiB, vcpus: 1}\n"
    pad = b"#" + b"x" * 1022 + b"\n"
    with open(f, "wb") as h:
        h.write(body)
        while h.tell() + len(pad) <= manifest.MAX_FILE_BYTES:
            h.write(pad)
    assert os.path.getsize(f) <= manifest.MAX_FILE_BYTES
    run = cli("validate", str(f))
    assert run.code == 0, run.err


BOMB = """\
a: &a ["lol","lol","lol","lol","lol","lol","lol","lol","lol"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h]
j: &j [*i,*i,*i,*i,*i,*i,*i,*i,*i]
"""

_MEASURE = r"""
import json, resource, sys, time
from reconciler.cli import main
t0 = time.process_time()
code = main(["validate", sys.argv[1]])
print(json.dumps({"code": code, "cpu": time.process_time() - t0,
                  "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}), file=sys.stderr)
"""


def test_alias_bomb_fails_fast_in_bounded_memory(tmp_path):
    """9**10 (3.5 billion) strings once expanded: refused while counting nodes, before anything is built.
    Measured in its own process: peak RSS and CPU time, with bounds far above what the check needs
    (~35 MiB, ~0.05 s) and far below what an expansion would take (hundreds of GiB, hours)."""
    f = tmp_path / "bomb.yaml"
    f.write_text(BOMB)
    p = subprocess.run([sys.executable, "-c", _MEASURE, str(f)], capture_output=True, text=True,
                       cwd=str(ROOT), timeout=120)
    import json
    err_lines = p.stderr.strip().splitlines()
    stats = json.loads(err_lines[-1])
    message = "\n".join(err_lines[:-1])
    assert stats["code"] == 1 and "Traceback" not in p.stderr
    assert message.startswith("error: ") and str(f) in message and "too deeply aliased" in message, message
    assert stats["maxrss_kib"] < 200 * 1024, stats
    assert stats["cpu"] < 10, stats


def test_alias_bomb_inside_a_real_manifest_is_refused(tmp_path, prefix):
    f = tmp_path / "vm.yaml"
    f.write_text(BOMB.replace("\n", "\n  ").replace("a: &a", "x:\n  a: &a", 1) and
                 f"apiVersion: reconciler/v1\nkind: VirtualMachine\nmetadata:\n  name: {prefix}vm\n"
                 f"  labels:\n    l0: &a [x,x,x,x,x,x,x,x,x,x]\n"
                 + "".join(f"    l{i}: &{chr(97 + i)} [" + ",".join([f"*{chr(96 + i)}"] * 10) + "]\n" for i in range(1, 9))
                 + "spec: {memory: 64MiB, vcpus: 1}\n")
    t0 = time.monotonic()
    run = cli("validate", str(f))
    assert_one_clear_error(run, f, None, ["too deeply aliased"])
    assert time.monotonic() - t0 < 60


def test_deep_nesting_fails_fast(tmp_path):
    f = tmp_path / "deep.yaml"
    f.write_text("[" * 100_000 + "]" * 100_000 + "\n")
    t0 = time.monotonic()
    run = cli("validate", str(f))
    assert_one_clear_error(run, f, 1, [f"nested deeper than {manifest.MAX_DEPTH} levels"])
    assert time.monotonic() - t0 < 30


def test_many_small_documents_within_limits_are_accepted_quickly(tmp_path):
    f = tmp_path / "many.yaml"
    f.write_text("".join(f"---\napiVersion: reconciler/v1\nkind: VirtualMachine\nmetadata: {{name: vm{i}}}\n"
                         f"spec: {{memory: 64MiB, vcpus: 1}}\n" for i in range(2000)))
    run = cli("validate", str(f))
    assert run.code == 0 and "VirtualMachine=2000" in run.out, run.err


# --------------------------------------------------------------------------- hidden files and odd paths

def test_hidden_files_and_non_yaml_files_are_not_read(tmp_path):
    d = tmp_path / "m"
    (d / ".git").mkdir(parents=True)
    (d / ".git" / "bad.yaml").write_text("{{{{")
    (d / ".hidden.yaml").write_text("{{{{")
    (d / "notes.txt").write_text("{{{{")
    (d / "README.md").write_bytes(b"\0\0\0")
    write(d / "ok.yaml", doc("VirtualMachine", "vm1", {"memory": "64MiB", "vcpus": 1}))
    run = cli("validate", str(d))
    assert run.code == 0 and "VirtualMachine=1" in run.out, run.err


# --------------------------------------------------------------------------- hostile text in XML

HOSTILE = [
    "</description><devices><disk type='file'><source file='/etc/shadow'/></disk></devices><description>",
    "]]><![CDATA[x]]>",
    "a < b && c > d; \"double\" 'single' &amp; &lt; &#x41; &unknown;",
    "<?xml version='1.0'?><!DOCTYPE x [<!ENTITY e SYSTEM 'file:///etc/passwd'>]>&e;",
    "unicode: Grüße, 日本語, emoji 🚀, right-to-left \u202e, zero-width \u200b, tab\tand\nnewline",
    "  leading and trailing spaces  ",
]


@pytest.mark.libvirt
@pytest.mark.parametrize("i", range(len(HOSTILE)))
def test_hostile_text_in_description_and_labels_round_trips(i, prefix, tmp_path, qemu_uri):
    """Descriptions and label values are XML text built with ElementTree: whatever they hold comes back
    as the same text from libvirt, creates no element, and plan reports no change afterwards."""
    text = HOSTILE[i]
    name = f"{prefix}vm"
    vm = doc("VirtualMachine", name, {"hypervisor": "qemu", "memory": "64MiB", "vcpus": 1, "state": "shutoff",
                                      "description": text},
             labels={"note": text, "amp": "&", "lt": "<x>"})
    m = write(tmp_path / "m" / "vm.yaml", vm)
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert run.code == 0, run.out + run.err
    from test_adversarial_support import domains
    import xml.etree.ElementTree as ET
    xml = domains(qemu_uri, name)[name]["xml"]
    root = ET.fromstring(xml)
    assert root.findtext("description") == text
    assert root.find("devices/disk") is None, "text became an element"
    labels = {l.get("key"): l.text or "" for l in root.iter("{https://reconciler.dev/xmlns/domain/v1}label")}
    assert labels == {"note": text, "amp": "&", "lt": "<x>"}
    assert "/etc/passwd" not in (root.findtext("description") or "").replace(text, "")
    plan = cli("plan", str(m), "--libvirt-uri", qemu_uri, "-o", "json")
    assert plan.code == 0 and plan.json["changes"] == [], plan.out + plan.err
    # And after an update with the hostile text changed in place (setMetadata path, not define).
    vm["spec"]["description"] = text[::-1]
    vm["metadata"]["labels"]["note"] = text + "!"
    write(m, vm)
    run = cli("apply", str(m), "--libvirt-uri", qemu_uri)
    assert run.code == 0 and "changed=1" in run.recap, run.out + run.err
    root = ET.fromstring(domains(qemu_uri, name)[name]["xml"])
    assert root.findtext("description") == text[::-1]
    assert cli("plan", str(m), "--libvirt-uri", qemu_uri).code == 0


# --------------------------------------------------------------------------- bad MQTT input against a real broker

@pytest.mark.mqtt
@pytest.mark.parametrize("case", ["topic-nul", "topic-retained-with-wildcard", "acl-misplaced-wildcard",
                                  "secret-literal", "secret-missing-env"])
def test_bad_mqtt_manifest_changes_nothing_on_the_broker(case, prefix, mq, tmp_path):
    """Next to a valid role and client, a bad MQTT document stops the whole run: the broker's dynamic
    security lists are the same before and after (nothing was sent to it)."""
    text, expect, secrets, line = load_case(case, prefix)
    d = tmp_path / "m"
    pw = tmp_path / "pw"
    pw.write_text(mq.secret("good-client-pw-7") + "\n")
    write(d / "a-good.yaml",
          doc("MqttRole", f"{prefix}okrole", {"acls": [{"type": "publishClientSend", "topic": f"{prefix}/ok"}]}),
          doc("MqttClient", f"{prefix}okclient", {"password": {"fromFile": str(pw)}, "roles": [{"name": f"{prefix}okrole"}]}),
          doc("Topic", f"{prefix}/ok", {"retained": {"payload": "must not be published"}}))
    bad = d / "case.yaml"
    bad.write_text(text)
    mq.secrets += secrets
    before = [mq.ctrl(c) for c in ("listRoles", "listClients", "listGroups")]
    run = mq.run("apply", str(d))
    assert_one_clear_error(run, bad, line, expect, secrets)
    assert [mq.ctrl(c) for c in ("listRoles", "listClients", "listGroups")] == before
    assert f"{prefix}okrole" not in before[0]
