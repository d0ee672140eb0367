"""Secrets: read a value from its source ({fromEnv: VAR} or {fromFile: PATH}), hold it where it cannot
leak (`Secret`), and fingerprint it with a random salt so a changed source can be told from an unchanged one.

A `Secret` prints as `<secret from environment variable X>` in repr, str and f-strings, cannot be
JSON-encoded, and hands its value out only through `reveal()`. Errors name the variable or the
path, never a value. A manifest's relative `fromFile` path has already been made absolute against the
manifest's folder (MqttClientRules.resolve_paths); any other relative path is read from the working folder.
"""
from __future__ import annotations

import base64
import hashlib
import hmac
import os
import secrets as _random

from .errors import ManifestError

FINGERPRINT_SCHEME = "pbkdf2-sha256"
# Every no-op plan verifies each client's fingerprint: at 60,000 rounds 200 clients cost 3.9 s.
# 1,000 rounds is ten times what Mosquitto itself uses for the password hash it stores right
# beside this fingerprint (101), so it weakens nothing; the count is part of each fingerprint,
# so older ones still verify.
FINGERPRINT_ITERATIONS = 1_000
SALT_BYTES = 16
MAX_SECRET_BYTES = 64 * 1024


def describe(source: dict) -> str:
    """Where a secret comes from, for messages: `environment variable X` or `file /path`."""
    if "fromEnv" in source:
        return f"environment variable {source['fromEnv']}"
    return f"file {source['fromFile']}"


class Secret:
    """A secret value that never shows itself. Compare with ==; get the value with reveal()."""

    __slots__ = ("_value", "source")

    def __init__(self, value: str, source: str):
        self._value = value
        self.source = source

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return f"<secret from {self.source}>"

    __str__ = __repr__

    def __format__(self, spec: str) -> str:
        return repr(self)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Secret):
            return NotImplemented
        return hmac.compare_digest(self._value.encode(), other._value.encode())

    def __hash__(self) -> int:
        return hash(self.source)

    def __reduce__(self):
        # A pickled Secret keeps its value (copying a Resource must not lose it); nothing prints a pickle.
        return (Secret, (self._value, self.source))

    def __copy__(self):
        return self

    def __deepcopy__(self, memo):
        return self


def read_secret(source: dict) -> str:
    """The value of a secret source; ManifestError naming the variable or path when it is missing."""
    if "fromEnv" in source:
        name = source["fromEnv"]
        value = os.environ.get(name)
        if value is None:
            raise ManifestError(f"environment variable {name} is not set")
        if value == "":
            raise ManifestError(f"environment variable {name} is empty")
        return value
    if "fromFile" in source:
        path = source["fromFile"]
        try:
            if os.path.isdir(path):
                raise ManifestError(f"secret file {path} is a directory")
            with open(path, "rb") as f:
                raw = f.read(MAX_SECRET_BYTES + 1)
        except OSError as e:
            raise ManifestError(f"secret file {path} cannot be read: {e.strerror}") from None
        if len(raw) > MAX_SECRET_BYTES:
            raise ManifestError(f"secret file {path} is larger than {MAX_SECRET_BYTES} bytes")
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError:
            raise ManifestError(f"secret file {path} is not UTF-8 text") from None
        # One trailing line end is the file's, not the secret's (echo pw > file).
        if text.endswith("\r\n"):
            text = text[:-2]
        elif text.endswith("\n"):
            text = text[:-1]
        if text == "":
            raise ManifestError(f"secret file {path} is empty")
        return text
    raise ManifestError("a secret must be {fromEnv: VAR} or {fromFile: /path}")


def _b64(b: bytes) -> str:
    return base64.b64encode(b).decode("ascii")


def fingerprint(value: str, *, salt: bytes | None = None, iterations: int = FINGERPRINT_ITERATIONS) -> str:
    """`pbkdf2-sha256$ITERATIONS$SALT$HASH` of a secret; a new random salt unless one is given."""
    salt = salt if salt is not None else _random.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha256", value.encode("utf-8"), salt, iterations)
    return f"{FINGERPRINT_SCHEME}${iterations}${_b64(salt)}${_b64(digest)}"


def verify(value: str, fp: str | None) -> bool:
    """Whether `value` is the secret `fp` was made from. False for a missing or unreadable fingerprint."""
    if not fp or not isinstance(fp, str):
        return False
    try:
        scheme, iterations, salt, digest = fp.split("$")
        if scheme != FINGERPRINT_SCHEME:
            return False
        n = int(iterations)
        if not 1_000 <= n <= 10_000_000:
            return False
        want = base64.b64decode(digest, validate=True)
        got = hashlib.pbkdf2_hmac("sha256", value.encode("utf-8"), base64.b64decode(salt, validate=True), n)
    except (ValueError, TypeError):
        return False
    return hmac.compare_digest(want, got)
