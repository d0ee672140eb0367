"""Documents -> Resources: each document checked against its kind's JSON Schema and the kind's own
rules, normalised, then all of them checked together (unique names, references). Errors name the
file, line, kind and name, and say what to write instead. Reads no file itself (source.py does)."""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any

from ..errors import ManifestError
from ..model import Resource, ResourceId
from .source import NOT_IN_XML, Document

SCHEMA_DIR = Path(__file__).resolve().parent.parent / "schemas"


# --------------------------------------------------------------------------- schemas

@lru_cache(maxsize=None)
def _ecma_regex(pattern: str) -> "re.Pattern":
    """A schema pattern with ECMA-262's meaning of `$` (JSON Schema's regex dialect): the very end of
    the string. Python's `$` also matches before a final newline, which would let a name such as
    "gw-1\\n" pass ^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$ and reach libvirt's XML or a broker."""
    out, i, in_class = [], 0, False
    while i < len(pattern):
        c = pattern[i]
        if c == "\\":
            out.append(pattern[i:i + 2])
            i += 2
            continue
        if c == "[":
            in_class = True
        elif c == "]":
            in_class = False
        out.append("\\Z" if c == "$" and not in_class else c)
        i += 1
    return re.compile("".join(out))


def _pattern_keyword(validator, pattern, instance, schema):
    from jsonschema.exceptions import ValidationError
    if validator.is_type(instance, "string") and not _ecma_regex(pattern).search(instance):
        yield ValidationError(f"{instance!r} does not match {pattern!r}")


def _schema(kind: str) -> dict:
    with open(SCHEMA_DIR / f"{kind}.json", encoding="utf-8") as f:
        return json.load(f)


# Compiled validators are immutable once built, so one per process is safe to share between threads.
@lru_cache(maxsize=None)
def validator(kind: str):
    """jsonschema's validator of a kind: slow, but its errors say exactly what is wrong and where."""
    import jsonschema
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern_keyword})
    return cls(_schema(kind))


@lru_cache(maxsize=None)
def fast_validator(kind: str):
    """jsonschema-rs's validator of a kind, 25 times faster on a valid document; its regexes are
    ECMA-262's, as JSON Schema specifies. Only answers "valid?": a document it rejects is validated
    again by `validator` for a precise message. None where it is not installed."""
    try:
        import jsonschema_rs
    except ImportError:
        return None
    return jsonschema_rs.validator_for(_schema(kind))


def schema_errors(kind: str, data: Any) -> list:
    """jsonschema errors of a document, deepest first; [] when valid (asked of the fast validator first)."""
    fast = fast_validator(kind)
    if fast is not None:
        try:
            if fast.is_valid(data):
                return []
        except (ValueError, TypeError, OverflowError):
            pass  # a value it cannot take (a huge integer): let jsonschema explain
    errors = [_refine(e) for e in validator(kind).iter_errors(data)]
    return sorted(errors, key=lambda e: -len(list(e.absolute_path)))


def _refine(err):
    """For "matches none of the allowed forms", the error inside a form that reaches deepest: a list
    item that is a network interface in every way but its unquoted MAC is about the MAC."""
    while err.validator in ("oneOf", "anyOf") and err.context:
        deeper = [e for e in err.context if len(e.absolute_path) > len(err.absolute_path)]
        if not deeper:
            break
        err = max(deeper, key=lambda e: len(e.absolute_path))
    return err


_BOOL_WORDS = {"yes", "no", "on", "off", "y", "n", "true", "false"}


def schema_message(err, kind: str, doc: Document | None = None) -> str:
    """A jsonschema error as one sentence that says what to write instead, never quoting a secret."""
    parts = [str(p) for p in err.absolute_path]
    path = ".".join(parts) or "(document)"
    v = err.validator
    inst = err.instance
    if "password" in parts or "mqttPassword" in parts:
        return f"{path}: a secret must be {{fromEnv: VAR}} or {{fromFile: /path}}; literal values are not allowed"
    written = doc.text_at(tuple(err.absolute_path)) if doc is not None else None
    if isinstance(inst, bool) and _expects(err, "string"):
        word = written or str(inst).lower()
        return f"{path}: YAML reads the unquoted {word} as {str(inst).lower()}: quote it ({path.rsplit('.', 1)[-1]}: \"{word}\")"
    if parts and parts[-1] == "mac" and not isinstance(inst, str):
        shown = written or str(inst)
        return f"{path}: quote the MAC (mac: \"{shown}\"): YAML reads an unquoted 52:54:00:... as a number"
    if isinstance(inst, (int, float)) and not isinstance(inst, bool) and written and ":" in written and _expects(err, "string"):
        return f"{path}: quote {written} (YAML reads it as the number {inst})"
    if v == "additionalProperties":
        extra = sorted(set(inst) - set(err.schema.get("properties", {})))
        allowed = ", ".join(sorted(err.schema.get("properties", {})))
        return (f"{path}: unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}"
                + (f" (allowed here: {allowed})" if allowed else ""))
    if v == "required":
        return f"{path}: {err.message}"
    if v in ("oneOf", "anyOf"):
        what = err.schema.get("description")
        if what:
            return f"{path}: {_short(inst)} is not valid here: expected {what}"
        if isinstance(inst, dict):
            return f"{path}: does not match any allowed form (check its fields against the README's reference)"
        return f"{path}: {_short(inst)} is not one of the allowed forms"
    if v == "pattern" and err.schema.get("description"):
        return f"{path}: {_short(inst)} is not valid: expected {err.schema['description']}"
    msg = err.message
    if len(msg) > 200:
        msg = msg[:200] + "..."
    return f"{path}: {msg}"


def _expects(err, type_name: str) -> bool:
    t = err.schema.get("type")
    if t == type_name or (isinstance(t, list) and type_name in t):
        return True
    return any(_expects_schema(s, type_name) for s in err.schema.get("oneOf", []) + err.schema.get("anyOf", []))


def _expects_schema(s: dict, type_name: str) -> bool:
    t = s.get("type")
    return t == type_name or (isinstance(t, list) and type_name in t)


def _short(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


# --------------------------------------------------------------------------- one document

def _xml_unsafe(data: Any, path: tuple = ()) -> tuple[tuple, str] | None:
    """The path of the first string (key or value) that libvirt's XML cannot hold unchanged, and why."""
    if isinstance(data, str):
        m = NOT_IN_XML.search(data)
        if m:
            c = m.group()
            what = "a carriage return (XML reads it back as a line feed)" if c == "\r" else \
                f"the character U+{ord(c):04X}, which XML cannot hold"
            return path, what
    elif isinstance(data, dict):
        for k, v in data.items():
            found = _xml_unsafe(k, path + (k,)) or _xml_unsafe(v, path + (k,))
            if found:
                return found
    elif isinstance(data, list):
        for i, v in enumerate(data):
            found = _xml_unsafe(v, path + (i,))
            if found:
                return found
    return None


_KINDS: list = []


def _kinds():
    # Imported on first use (the registry imports every kind), then kept: called once per document.
    if not _KINDS:
        from ..kinds.registry import BY_NAME
        _KINDS.append(BY_NAME)
    return _KINDS[0]


def build_one(doc: Document) -> Resource:
    """One document as a Resource, or a ManifestError naming its file, line, kind and name."""
    data, file = doc.data, doc.file
    if not isinstance(data, dict):
        shown = "null" if data is None else type(data).__name__
        raise ManifestError(f"a document must be a mapping, not {shown}: write apiVersion, kind, metadata and "
                            f"spec as its keys", file=file, line=doc.line)
    kind = data.get("kind")
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    kname = name if isinstance(name, str) else None
    if data.get("apiVersion") != "reconciler/v1":
        raise ManifestError("apiVersion must be reconciler/v1", file=file, line=doc.line_of(("apiVersion",)),
                            kind=kind if isinstance(kind, str) else None, name=kname)
    kinds = _kinds()
    if kind not in kinds:
        raise ManifestError(f"unknown kind {kind!r} (expected one of {', '.join(kinds)})", file=file,
                            line=doc.line_of(("kind",)), name=kname)
    errors = schema_errors(kind, data)
    if errors:
        err = errors[0]   # the deepest error is the most specific one
        where = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            # Point at the first unknown key itself, not at the mapping holding it.
            extra = [k for k in err.instance if k not in err.schema.get("properties", {})]
            if extra:
                where += (extra[0],)
        raise ManifestError(schema_message(err, kind, doc), file=file, line=doc.line_of(where), kind=kind, name=kname)
    rules = kinds[kind]
    if rules.target == "libvirt" and not doc.xml_safe:
        unsafe = _xml_unsafe(data)
        if unsafe:
            path, what = unsafe
            raise ManifestError(f"{'.'.join(map(str, path))}: contains {what}", file=file,
                                line=doc.line_of(path), kind=kind, name=kname)
    spec = data.get("spec") or {}
    for path, message in rules.check(name, spec):
        shown = ".".join(str(p) for p in path)
        raise ManifestError(f"{shown}: {message}" if path else message, file=file,
                            line=doc.line_of(path or ("metadata", "name")), kind=kind, name=name)
    labels = {str(k): str(v) if not isinstance(v, bool) else str(v).lower()
              for k, v in ((meta or {}).get("labels") or {}).items()}
    resolve = getattr(rules, "resolve_paths", None)
    if resolve is not None:
        # Relative paths in a manifest mean "next to this file", as in kustomize.
        spec = resolve(spec, os.path.dirname(os.path.abspath(file)))
    try:
        normalised = rules.normalise(spec)
    except ManifestError as e:
        if e.file:
            raise
        # A secret source that cannot be read is found while normalising: point at its field.
        at = ("spec", "password") if "password" in spec else ("spec",)
        raise ManifestError(e.message, file=file, line=doc.line_of(at), kind=kind, name=name) from None
    return Resource(id=ResourceId(kind, name), spec=normalised, labels=labels, declared=frozenset(spec))


# --------------------------------------------------------------------------- all together

def build(docs: list[Document]) -> list[Resource]:
    """Resources from documents, validated alone and together (unique names, references)."""
    resources: list[Resource] = []
    where: dict[ResourceId, Document] = {}
    for doc in docs:
        r = build_one(doc)
        if r.id in where:
            first = where[r.id]
            raise ManifestError(f"declared twice (first at {first.file}:{first.line})", file=doc.file,
                                line=doc.line, kind=r.id.kind, name=r.id.name)
        where[r.id] = doc
        resources.append(r)
    check_references(resources, where)
    return resources


def check_references(resources: list[Resource], where: dict[ResourceId, Document]) -> None:
    """References by name must name a declared object; a Disk's pool may also be one on the host."""
    declared = {r.id for r in resources}
    kinds = _kinds()
    for r in resources:
        for ref_kind, ref_name, path in kinds[r.id.kind].references(r.spec):
            if ResourceId(ref_kind, ref_name) not in declared:
                doc = where[r.id]
                shown = ".".join(str(p) for p in path)
                raise ManifestError(f"{shown} refers to {ref_kind} {ref_name!r}, which no manifest declares "
                                    f"(declare it, or correct the name)",
                                    file=doc.file, line=doc.line_of(path), kind=r.id.kind, name=r.id.name)
