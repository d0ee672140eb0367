"""Verified pull mode (contrib/pull/reconciler-pull-verified, contrib/systemd/reconciler-pull.service and
the ansible-pull variant): with a real git repository, real SSH and GPG commit signatures and a real
broker, a signed HEAD is applied; an unsigned HEAD, or one signed by a key the node does not trust,
is not: the last verified commit is applied again (drift on it is still corrected), the journal line
says so and reconciler_source_verified is 0."""
from __future__ import annotations

import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from helpers import ROOT, doc, unique, write
from mqtt_fixtures import Mqtt, start_broker

PULL = ROOT / "contrib" / "pull" / "reconciler-pull-verified"
SYSTEMD = ROOT / "contrib" / "systemd"
VENV_BIN = Path(sys.executable).parent


def git(cwd: Path, *args: str, env: dict | None = None) -> str:
    p = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, timeout=120,
                       env={**os.environ, **(env or {})})
    assert p.returncode == 0, f"git {' '.join(args)}: {p.stderr}"
    return p.stdout.strip()


def metric(path: Path, name: str) -> float:
    m = re.search(rf"^{name} (\S+)$", path.read_text(), re.M)
    assert m, f"{name} missing from {path}: {path.read_text()}"
    return float(m.group(1))


class Site:
    """A GitOps repository (bare origin), an author's clone that signs with SSH keys, and the node's clone."""

    def __init__(self, tmp: Path):
        self.tmp = tmp
        keys = tmp / "keys"
        keys.mkdir()
        for name in ("trusted", "untrusted"):
            subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-C", name, "-f", str(keys / name)],
                           check=True, timeout=60)
        self.trusted_key, self.untrusted_key = keys / "trusted", keys / "untrusted"
        self.allowed = tmp / "allowed_signers"
        self.allowed.write_text(f"ops@example.com {(keys / 'trusted.pub').read_text().strip()}\n")
        self.origin = tmp / "origin.git"
        git(tmp, "init", "-q", "--bare", "-b", "main", str(self.origin))
        self.author = tmp / "author"
        git(tmp, "clone", "-q", str(self.origin), str(self.author))
        for k, v in (("user.name", "Ops"), ("user.email", "ops@example.com"), ("gpg.format", "ssh"),
                     ("commit.gpgsign", "false")):
            git(self.author, "config", k, v)
        self.node = tmp / "node"
        self.metrics = tmp / "textfile"
        self.metrics.mkdir()

    def commit(self, files: dict[str, list[dict] | str], message: str, *, key: Path | None = None) -> str:
        """Write files into the author's clone, commit (signed with `key`, or unsigned) and push."""
        for rel, content in files.items():
            path = self.author / rel
            if isinstance(content, str):
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(content)
            else:
                write(path, *content)
        git(self.author, "add", "-A")
        sign = ["-c", f"user.signingkey={key}", "commit", "-S"] if key else ["commit"]
        git(self.author, *sign, "-q", "-m", message)
        git(self.author, "push", "-q", "origin", "main")
        if not self.node.exists():
            git(self.tmp, "clone", "-q", str(self.origin), str(self.node))
        return git(self.author, "rev-parse", "HEAD")

    def pull(self, *command: str, env: dict | None = None, trust: list[str] | None = None) -> subprocess.CompletedProcess:
        args = [str(PULL), "--repo", str(self.node), *(trust or ["--allowed-signers", str(self.allowed)]),
                "--metrics-file", str(self.metrics / "reconciler-source.prom"), "--", *command]
        return subprocess.run(args, capture_output=True, text=True, timeout=300, env={**os.environ, **(env or {})})

    @property
    def verified(self) -> float:
        return metric(self.metrics / "reconciler-source.prom", "reconciler_source_verified")


def role(name: str, description: str) -> dict:
    return doc("MqttRole", name, {"description": description,
                                  "acls": [{"type": "publishClientSend", "topic": f"{name}/+/data"}]})


@pytest.fixture
def mq(tmp_path):
    b = start_broker(tmp_path / "broker")
    try:
        yield Mqtt(b, tmp_path)
    finally:
        b.stop()


def roles(mq: Mqtt) -> dict:
    """Role name -> its description as declared (the broker's text also holds the ownership marker)."""
    return {r["rolename"]: (r.get("textdescription") or "").split("\n")[0] for r in mq.dynsec_file().get("roles", [])}


def test_signed_head_applied_unsigned_and_untrusted_not(tmp_path, mq):
    site = Site(tmp_path)
    prefix = unique("pv")
    env = {**mq.env(), "RECONCILER_SCOPE": prefix}
    apply = [sys.executable, "-m", "reconciler", "apply", "common", "hosts/node1", "--quiet",
             "--metrics-file", str(site.metrics / "reconciler.prom")]
    v1 = site.commit({"common/roles.yaml": [role(f"{prefix}-a", "v1")],
                      "hosts/node1/roles.yaml": [role(f"{prefix}-n", "node v1")]}, "v1", key=site.trusted_key)

    first = site.pull(*apply, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert "changed=2" in first.stdout, first.stdout
    assert f"at {v1[:12]} is signed by a trusted key" in first.stderr
    assert roles(mq)[f"{prefix}-a"] == "v1"
    assert site.verified == 1
    # The reconciler's own metrics file sits beside the source metrics.
    assert metric(site.metrics / "reconciler.prom", "reconciler_last_run_success") == 1
    second = site.pull(*apply, env=env)
    assert second.returncode == 0 and "changed=0" in second.stdout, second.stdout + second.stderr

    # An unsigned HEAD that would rewrite the role and add one: not applied, v1 is, and it says so.
    v2 = site.commit({"common/roles.yaml": [role(f"{prefix}-a", "v2 unsigned"), role(f"{prefix}-evil", "x")]},
                     "v2 unsigned")
    mq.ctrl("removeRoleACL", f"{prefix}-a", "publishClientSend", f"{prefix}-a/+/data")   # drift by hand
    third = site.pull(*apply, env=env)
    assert third.returncode == 0, third.stdout + third.stderr
    assert f"origin/main at {v2[:12]} is NOT signed by a trusted key" in third.stderr
    assert f"applying the last verified commit {v1[:12]}" in third.stderr
    live = roles(mq)
    assert live[f"{prefix}-a"] == "v1" and f"{prefix}-evil" not in live
    assert "changed=1" in third.stdout, third.stdout        # the drift on v1 was corrected
    assert site.verified == 0
    assert git(site.node, "rev-parse", "HEAD") == v1
    assert "v2 unsigned" not in (site.node / "common" / "roles.yaml").read_text()

    # Signed, but by a key the node does not trust; and a file dropped into the work tree by hand.
    v3 = site.commit({"common/roles.yaml": [role(f"{prefix}-a", "v3 untrusted")]}, "v3", key=site.untrusted_key)
    write(site.node / "hosts" / "node1" / "dropped.yaml", role(f"{prefix}-dropped", "by hand"))
    fourth = site.pull(*apply, env=env)
    assert fourth.returncode == 0, fourth.stdout + fourth.stderr
    assert f"at {v3[:12]} is NOT signed by a trusted key" in fourth.stderr and "No principal matched" in fourth.stderr
    live = roles(mq)
    assert live[f"{prefix}-a"] == "v1" and f"{prefix}-dropped" not in live
    assert not (site.node / "hosts" / "node1" / "dropped.yaml").exists()
    assert "changed=0" in fourth.stdout and site.verified == 0

    # A signed commit on top of the unsigned ones is applied as a whole.
    v4 = site.commit({"common/roles.yaml": [role(f"{prefix}-a", "v4")]}, "v4", key=site.trusted_key)
    fifth = site.pull(*apply, env=env)
    assert fifth.returncode == 0, fifth.stdout + fifth.stderr
    assert roles(mq)[f"{prefix}-a"] == "v4" and site.verified == 1
    assert git(site.node, "rev-parse", "HEAD") == v4 == git(site.node, "rev-parse", "reconciler-verified")


def test_gpg_keyring_is_the_trust(tmp_path):
    """GPG signatures: a key in the node's trusted GnuPG home verifies; another key, even one in
    root's own keyring, does not."""
    homes = {n: tmp_path / f"gnupg-{n}" for n in ("signer", "other", "trusted")}
    for h in homes.values():
        h.mkdir(mode=0o700)
    try:
        for n, email in (("signer", "ops@example.com"), ("other", "intruder@example.com")):
            subprocess.run(["gpg", "--batch", "--quiet", "--passphrase", "", "--quick-gen-key", f"{n} <{email}>",
                            "ed25519", "sign", "never"], env={**os.environ, "GNUPGHOME": str(homes[n])},
                           check=True, capture_output=True, timeout=120)
        exported = subprocess.run(["gpg", "--export", "ops@example.com"], env={**os.environ, "GNUPGHOME": str(homes["signer"])},
                                  check=True, capture_output=True, timeout=60).stdout
        subprocess.run(["gpg", "--batch", "--quiet", "--import"], input=exported, check=True, capture_output=True,
                       env={**os.environ, "GNUPGHOME": str(homes["trusted"])}, timeout=60)
        site = Site(tmp_path)
        git(site.author, "config", "gpg.format", "openpgp")
        validate = [sys.executable, "-m", "reconciler", "validate", "common"]
        trust = ["--gnupghome", str(homes["trusted"])]

        write(site.author / "common" / "r.yaml", role("gpg-a", "signed"))
        git(site.author, "add", "-A")
        git(site.author, "-c", "user.signingkey=ops@example.com", "commit", "-q", "-S", "-m", "gpg signed",
            env={"GNUPGHOME": str(homes["signer"])})
        git(site.author, "push", "-q", "origin", "main")
        good = git(site.author, "rev-parse", "HEAD")
        git(tmp_path, "clone", "-q", str(site.origin), str(site.node))
        r = site.pull(*validate, trust=trust)
        assert r.returncode == 0, r.stderr
        assert f"at {good[:12]} is signed by a trusted key" in r.stderr and site.verified == 1

        write(site.author / "common" / "r.yaml", role("gpg-a", "other key"))
        git(site.author, "-c", "user.signingkey=intruder@example.com", "commit", "-q", "-S", "-a", "-m", "other",
            env={"GNUPGHOME": str(homes["other"])})
        git(site.author, "push", "-q", "origin", "main")
        # Even with the intruder's key in the caller's own GNUPGHOME: only --gnupghome counts.
        r = site.pull("git", "rev-parse", "HEAD", trust=trust, env={"GNUPGHOME": str(homes["other"])})
        assert r.returncode == 0, r.stderr
        assert "NOT signed by a trusted key" in r.stderr and r.stdout.strip() == good and site.verified == 0
        # The SSH-only configuration trusts no GPG key at all (root's keyring is never consulted).
        r = site.pull("true", env={"GNUPGHOME": str(homes["other"])})
        assert "NOT signed by a trusted key" in r.stderr and site.verified == 0
    finally:
        for h in homes.values():
            subprocess.run(["gpgconf", "--homedir", str(h), "--kill", "all"], capture_output=True, timeout=30)


def test_nothing_verified_yet_runs_nothing(tmp_path):
    site = Site(tmp_path)
    site.commit({"common/r.yaml": [role("x", "unsigned")]}, "unsigned")
    marker = tmp_path / "ran"
    r = site.pull("touch", str(marker))
    assert r.returncode == 1
    assert "no verified commit yet: nothing applied" in r.stderr
    assert not marker.exists() and site.verified == 0


def test_failed_fetch_applies_the_last_verified_commit(tmp_path):
    site = Site(tmp_path)
    v1 = site.commit({"common/r.yaml": [role("x", "v1")]}, "v1", key=site.trusted_key)
    assert site.pull("true").returncode == 0
    shutil.move(site.origin, tmp_path / "gone.git")          # the site's git server is unreachable
    r = site.pull("git", "rev-parse", "HEAD")
    assert r.returncode == 0, r.stderr
    assert "git fetch origin main failed" in r.stderr and r.stdout.strip() == v1
    assert metric(site.metrics / "reconciler-source.prom", "reconciler_source_fetch_success") == 0
    assert site.verified == 1


def test_clone_without_checkout_and_usage_errors(tmp_path):
    site = Site(tmp_path)
    site.commit({"common/r.yaml": [role("x", "v1")]}, "unsigned")
    fresh = tmp_path / "fresh"
    r = subprocess.run([str(PULL), "--repo", str(fresh), "--url", str(site.origin), "--allowed-signers",
                        str(site.allowed), "--", "true"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "no verified commit yet" in r.stderr
    # The unverified commit was never checked out on the node.
    assert not (fresh / "common").exists()
    r = subprocess.run([str(PULL), "--repo", str(fresh), "--", "true"], capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "--allowed-signers FILE and/or --gnupghome DIR" in r.stderr


def test_units_run_the_verifier(tmp_path):
    for name in ("reconciler-pull.service", "reconciler-ansible-pull.service"):
        text = (SYSTEMD / name).read_text()
        start = re.search(r"^ExecStart=(.*)$", text, re.M).group(1)
        assert start.startswith("/usr/local/bin/reconciler-pull-verified --repo ${REPO} --allowed-signers ")
        assert "--metrics-file ${METRICS}/reconciler-source.prom -- " in start
        assert "ExecStartPre" not in text, "an unverified git pull before the verifier would defeat it"
    assert "-- /usr/local/bin/reconciler apply ${REPO}/common ${REPO}/hosts/%H" in (SYSTEMD / "reconciler-pull.service").read_text()
    ap = (SYSTEMD / "reconciler-ansible-pull.service").read_text()
    assert "ansible-pull --url ${REPO} --checkout reconciler-verified --verify-commit" in ap
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify checks that ExecStart= programs exist: point them at this checkout's.
    for name in ("reconciler-pull.service", "reconciler-ansible-pull.service"):
        text = (SYSTEMD / name).read_text().replace("/usr/local/bin/reconciler-pull-verified", str(PULL)) \
            .replace("/usr/bin/ansible-pull", str(VENV_BIN / "ansible-pull"))
        (tmp_path / name).write_text(text)
    p = subprocess.run(["systemd-analyze", "verify", *[str(tmp_path / n) for n in
                                                      ("reconciler-pull.service", "reconciler-ansible-pull.service")]],
                       capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and not p.stderr.strip(), p.stderr


def test_ansible_pull_example_applies_only_the_verified_commit(tmp_path, mq):
    """The ansible-pull unit's command line, run for real: reconciler-pull-verified, then ansible-pull
    of the local branch reconciler-verified with --verify-commit, running examples/local.yml."""
    site = Site(tmp_path)
    prefix = unique("ap")
    gitconfig = tmp_path / "gitconfig"      # root's git config on a node: ansible-pull's git verifies with it
    gitconfig.write_text(f"[gpg \"ssh\"]\n\tallowedSignersFile = {site.allowed}\n")
    env = {**mq.env(), "RECONCILER_SCOPE": prefix, "GIT_CONFIG_GLOBAL": str(gitconfig),
           "ANSIBLE_COLLECTIONS_PATH": str(ROOT / "contrib" / "ansible"), "ANSIBLE_LOCAL_TEMP": str(tmp_path / "at"),
           "ANSIBLE_REMOTE_TEMP": str(tmp_path / "rt"), "ANSIBLE_PYTHON_INTERPRETER": sys.executable,
           "ANSIBLE_CONFIG": str(tmp_path / "none.cfg"), "ANSIBLE_NOCOLOR": "1", "ANSIBLE_RETRY_FILES_ENABLED": "0",
           "ANSIBLE_HOME": str(tmp_path / "ansible-home")}
    local = (ROOT / "contrib" / "ansible" / "examples" / "local.yml").read_text()
    pull = [str(VENV_BIN / "ansible-pull"), "--url", str(site.node), "--checkout", "reconciler-verified",
            "--verify-commit", "--directory", str(tmp_path / "ansible-pull"), "--inventory", "localhost,",
            "-e", "reconciler_host=node1", "-e", f"reconciler_bin={VENV_BIN / 'reconciler'}", "local.yml"]
    v1 = site.commit({"local.yml": local, "common/roles.yaml": [role(f"{prefix}-a", "v1")],
                      "hosts/node1/roles.yaml": [role(f"{prefix}-n", "node")]}, "v1", key=site.trusted_key)
    r = site.pull(*pull, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert roles(mq)[f"{prefix}-a"] == "v1" and site.verified == 1
    assert re.search(r"localhost\s+: ok=\d+\s+changed=1 ", r.stdout), r.stdout
    r = site.pull(*pull, env=env)
    assert r.returncode == 0 and re.search(r"localhost\s+: ok=\d+\s+changed=0 ", r.stdout), r.stdout + r.stderr

    site.commit({"common/roles.yaml": [role(f"{prefix}-a", "v2 unsigned")]}, "v2 unsigned")
    r = site.pull(*pull, env=env)
    assert r.returncode == 0, r.stdout + r.stderr
    assert f"applying the last verified commit {v1[:12]}" in r.stderr
    assert roles(mq)[f"{prefix}-a"] == "v1" and site.verified == 0
    assert re.search(r"localhost\s+: ok=\d+\s+changed=0 ", r.stdout), r.stdout


def test_two_runs_at_once_the_second_does_nothing(tmp_path):
    """ansible-pull and a hand-started run must not fight over the work tree: one lock per repository."""
    site = Site(tmp_path)
    site.commit({"common/r.yaml": [role("x", "v1")]}, "v1", key=site.trusted_key)
    started, marker = tmp_path / "started", tmp_path / "second-ran"
    first = subprocess.Popen([str(PULL), "--repo", str(site.node), "--allowed-signers", str(site.allowed), "--",
                              "sh", "-c", f"touch {started}; sleep 60"], stderr=subprocess.PIPE, text=True,
                             start_new_session=True)
    try:
        for _ in range(600):
            if started.exists():
                break
            time.sleep(0.1)
        assert started.exists(), "the first run never started its command"
        second = site.pull("touch", str(marker))
        assert second.returncode == 0 and "another pull run holds the lock" in second.stderr
        assert not marker.exists()
    finally:
        os.killpg(first.pid, signal.SIGKILL)      # the wrapper and the sleep it started
        first.communicate(timeout=60)
