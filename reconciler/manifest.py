"""Find manifest files, load their YAML with line numbers, validate each document against its
JSON Schema and the kind's own rules, and build normalised Resources. No I/O beyond reading files."""
from __future__ import annotations

import json
import os
import re
from functools import lru_cache
from pathlib import Path
from typing import Any, Iterable

import yaml

from .errors import ManifestError
from .model import Resource, ResourceId

MAX_FILE_BYTES = 8 * 1024 * 1024       # a manifest file larger than this is refused
MAX_NODES = 200_000                    # YAML nodes per file once aliases are expanded
MAX_INT_DIGITS = 40                    # digits of an integer scalar; 2**64 has 20
MAX_DEPTH = 64                         # nesting of YAML collections; real manifests use under 10
SCHEMA_DIR = Path(__file__).with_name("schemas")


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


@lru_cache(maxsize=None)
def validator(kind: str):
    """The compiled validator of a kind, built once per process."""
    import jsonschema
    with open(SCHEMA_DIR / f"{kind}.json", encoding="utf-8") as f:
        schema = json.load(f)
    cls = jsonschema.validators.extend(jsonschema.Draft202012Validator, {"pattern": _pattern_keyword})
    return cls(schema)


@lru_cache(maxsize=None)
def fast_validator(kind: str):
    """jsonschema-rs's validator of a kind, six times faster than jsonschema on a valid document; its
    regexes are ECMA-262's, as JSON Schema specifies. Used only to answer "valid?": a document it
    rejects is validated again by `validator` for a precise message. None where it is not installed."""
    try:
        import jsonschema_rs
    except ImportError:
        return None
    with open(SCHEMA_DIR / f"{kind}.json", encoding="utf-8") as f:
        return jsonschema_rs.validator_for(json.load(f))


def find_files(paths: Iterable[str]) -> list[str]:
    """Files named, and *.yaml / *.yml below directories named, skipping hidden files and folders."""
    found: list[str] = []
    for p in paths:
        if os.path.isdir(p):
            for root, dirs, files in os.walk(p):
                dirs[:] = sorted(d for d in dirs if not d.startswith("."))
                for name in sorted(files):
                    if not name.startswith(".") and name.endswith((".yaml", ".yml")):
                        found.append(os.path.join(root, name))
        elif os.path.exists(p):
            found.append(p)
        else:
            raise ManifestError("no such file or directory", file=p)
    return found


class _TooDeep(yaml.MarkedYAMLError):
    """A document nested deeper than MAX_DEPTH."""


class _Loader(yaml.SafeLoader):
    """SafeLoader that refuses documents nested deeper than MAX_DEPTH before PyYAML's recursive
    composer can exhaust the stack (duplicate keys and alias bombs are refused by _check_nodes)."""

    _depth = 0

    def compose_node(self, parent, index):
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _TooDeep(None, None, f"nested deeper than {MAX_DEPTH} levels", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


class _ResolveOnce:
    """Implicit tag resolution of a plain scalar depends on its text alone; manifests repeat the
    same few texts thousands of times ("reconciler/v1", "64MiB", "true"), so remember the answers."""

    _tags: dict = {}

    def resolve(self, kind, value, implicit):
        if kind is yaml.ScalarNode and implicit[0]:
            key = (value, implicit[1])
            tag = self._tags.get(key)
            if tag is None:
                tag = super().resolve(kind, value, implicit)
                if len(self._tags) < 100_000:
                    self._tags[key] = tag
            return tag
        return super().resolve(kind, value, implicit)


_CLoader = type("_CLoader", (_ResolveOnce, yaml.CSafeLoader), {}) if hasattr(yaml, "CSafeLoader") else None


def _check_nodes(node: yaml.Node, file: str) -> None:
    """Refuse duplicate keys, nesting deeper than MAX_DEPTH, and count nodes as if every alias were
    expanded: a "billion laughs" document fails here, in time linear in the file, before anything
    is built from it."""
    sizes: dict[int, int] = {}

    def size(n: yaml.Node, depth: int) -> int:
        key = id(n)
        if key in sizes:
            return sizes[key]
        if depth > MAX_DEPTH:
            raise ManifestError(f"YAML document nested deeper than {MAX_DEPTH} levels", file=file,
                                line=n.start_mark.line + 1)
        sizes[key] = 1  # a recursive alias counts once and cannot loop
        total = 1
        if isinstance(n, yaml.MappingNode):
            seen: dict[Any, int] = {}
            for k, v in n.value:
                if isinstance(k, yaml.ScalarNode) and k.tag != "tag:yaml.org,2002:merge":
                    if k.value in seen:
                        raise ManifestError(f"duplicate key {k.value!r} (first at line {seen[k.value]})",
                                            file=file, line=k.start_mark.line + 1)
                    seen[k.value] = k.start_mark.line + 1
                total += size(k, depth + 1) + size(v, depth + 1)
        elif isinstance(n, yaml.SequenceNode):
            for v in n.value:
                total += size(v, depth + 1)
        elif n.tag == "tag:yaml.org,2002:int" and len(n.value) > MAX_INT_DIGITS:
            raise ManifestError(f"a number of {len(n.value)} digits is too long (at most {MAX_INT_DIGITS})",
                                file=file, line=n.start_mark.line + 1)
        if total > MAX_NODES:
            raise ManifestError(f"document too large or too deeply aliased (over {MAX_NODES} nodes)",
                                file=file, line=n.start_mark.line + 1)
        sizes[key] = total
        return total

    size(node, 1)


class _LazyNode:
    """The node of a document the fast path built without one: composed (the whole file, once) only
    when an error needs a field's line. `line` is the document's own first line, known from the start."""

    __slots__ = ("file", "text", "index", "line", "_file_nodes", "xml_safe")

    def __init__(self, file: str, text: str, index: int, line: int, file_nodes: list, xml_safe: bool = False):
        self.file, self.text, self.index, self.line, self._file_nodes = file, text, index, line, file_nodes
        # No character XML cannot hold, and no backslash that could write one: every string is safe.
        self.xml_safe = xml_safe

    def get(self) -> yaml.Node:
        if not self._file_nodes:
            self._file_nodes.extend(node for _, node in _load_with_nodes(self.file, self.text))
        return self._file_nodes[self.index]


def _real(node):
    return node.get() if isinstance(node, _LazyNode) else node


def _start_line(node) -> int:
    return node.line if isinstance(node, _LazyNode) else node.start_mark.line + 1


_SAFE = yaml.SafeLoader("")          # its constructors turn a resolved scalar into its value
_STR = "tag:yaml.org,2002:str"
_INT = "tag:yaml.org,2002:int"
_values: dict = {}


class _NotPlain(Exception):
    """The text uses something the fast path leaves to the node path (which knows all of YAML)."""


def _fast_documents(text: str) -> list[tuple[Any, int]] | None:
    """(data, first line) of each document, built straight from libyaml's events: five times faster
    than composing a node tree first (0.13 s against 0.32 s for 3,410 documents). Only plain
    mappings, sequences and scalars; anything else — anchors, aliases, explicit tags, merge keys,
    duplicate or non-scalar keys, scalar documents, nesting past MAX_DEPTH, long integers — returns
    None, and the node path builds the file (or reports its error with the exact line)."""
    if _CLoader is None:
        return None
    from yaml.events import (AliasEvent, MappingEndEvent, MappingStartEvent, ScalarEvent, SequenceEndEvent,
                             SequenceStartEvent)
    resolver = _CLoader("")
    docs: list[tuple[Any, int]] = []
    stack: list = []
    keys: list = []
    count = 0
    start_line = 0
    try:
        for ev in yaml.parse(text, Loader=yaml.CSafeLoader):
            t = type(ev)
            if t is ScalarEvent:
                if ev.anchor is not None or ev.tag is not None or not stack:
                    raise _NotPlain
                if ev.implicit[0]:
                    raw = ev.value
                    value = _values.get(raw, _values)
                    if value is _values:
                        tag = resolver.resolve(yaml.ScalarNode, raw, ev.implicit)
                        if tag == _STR:
                            value = raw
                        else:
                            if tag == _INT and len(raw) > MAX_INT_DIGITS:
                                raise _NotPlain
                            value = _SAFE.yaml_constructors[tag](_SAFE, yaml.ScalarNode(tag, raw))
                        if len(_values) < 100_000:
                            _values[raw] = value
                else:
                    value = ev.value
            elif t is MappingStartEvent or t is SequenceStartEvent:
                if ev.anchor is not None or ev.tag is not None or len(stack) >= MAX_DEPTH:
                    raise _NotPlain
                if not stack:
                    start_line = ev.start_mark.line + 1
                    count = 0
                stack.append({} if t is MappingStartEvent else [])
                keys.append(_NotPlain)
                continue
            elif t is MappingEndEvent or t is SequenceEndEvent:
                value = stack.pop()
                keys.pop()
            elif t is AliasEvent:
                raise _NotPlain
            else:
                continue
            count += 1
            if count > MAX_NODES:
                raise _NotPlain
            if not stack:
                docs.append((value, start_line))
                continue
            top = stack[-1]
            if type(top) is list:
                top.append(value)
            elif keys[-1] is _NotPlain:
                if type(value) is not str or value in top or value == "<<":
                    raise _NotPlain
                keys[-1] = value
            else:
                top[keys[-1]] = value
                keys[-1] = _NotPlain
    except (_NotPlain, yaml.YAMLError, ValueError, OverflowError, TypeError):
        return None
    return docs


def _line_of(node: yaml.Node, path: tuple) -> int:
    """The line of the deepest node along `path` that exists."""
    node = _real(node)
    line = node.start_mark.line + 1
    for part in path:
        if isinstance(node, yaml.MappingNode):
            nxt = next((v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(part)), None)
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int) and part < len(node.value):
            nxt = node.value[part]
        else:
            nxt = None
        if nxt is None:
            break
        node = nxt
        line = node.start_mark.line + 1
    return line


def read_text(file: str) -> str:
    """A manifest file's text: within the size limit, no NUL byte, valid UTF-8."""
    try:
        size = os.path.getsize(file)
        if size > MAX_FILE_BYTES:
            raise ManifestError(f"file is {size} bytes, over the limit of {MAX_FILE_BYTES}", file=file)
        with open(file, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise ManifestError(f"cannot read: {e.strerror}", file=file) from None
    if b"\0" in raw:
        raise ManifestError("binary content (NUL byte) is not a manifest", file=file)
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[: e.start].count(b"\n") + 1
        raise ManifestError("not valid UTF-8", file=file, line=line) from None


def load_documents(file: str, text: str | None = None) -> list[tuple[Any, yaml.Node]]:
    """(data, node) for each non-empty document of a file; the node may be composed only on demand."""
    if text is None:
        text = read_text(file)
    fast = _fast_documents(text)
    if fast is not None:
        shared: list = []
        safe = "\\" not in text and not _NOT_IN_XML.search(text)
        return [(data, _LazyNode(file, text, i, line, shared, safe)) for i, (data, line) in enumerate(fast)]
    return _load_with_nodes(file, text)


def _load_with_nodes(file: str, text: str) -> list[tuple[Any, yaml.Node]]:
    """(data, node) for each non-empty document, through a node tree: all of YAML, exact error lines."""
    docs = []
    try:
        # libyaml's parser is ten times faster than PyYAML's own, and caps nesting at 1,000 levels
        # itself, so its recursive composer cannot exhaust the stack; _check_nodes enforces MAX_DEPTH.
        loader = _CLoader(text) if _CLoader is not None else _Loader(text)
        try:
            while loader.check_node():
                node = loader.get_node()
                if node is None:
                    continue
                _check_nodes(node, file)
                try:
                    data = loader.construct_document(node)
                except (ValueError, OverflowError) as e:
                    # A scalar the safe constructors cannot turn into a value (a timestamp such as 2024-13-45).
                    raise ManifestError(f"a value cannot be read: {e}", file=file,
                                        line=node.start_mark.line + 1) from None
                docs.append((data, node))
        finally:
            loader.dispose()
    except _TooDeep as e:
        raise ManifestError(f"YAML document {e.problem}", file=file, line=e.problem_mark.line + 1) from None
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = mark.line + 1 if mark else None
        problem = e.problem or e.context or "invalid YAML"
        if "maximum nesting depth" in problem:  # libyaml's own cap, far above ours
            raise ManifestError(f"YAML document nested deeper than {MAX_DEPTH} levels", file=file, line=line) from None
        raise ManifestError(f"YAML syntax error: {problem}", file=file, line=line) from None
    except yaml.YAMLError as e:
        raise ManifestError(f"YAML error: {e}", file=file) from None
    except RecursionError:
        raise ManifestError("YAML nested too deeply", file=file) from None
    return docs


def _schema_message(err, kind: str) -> str:
    """A jsonschema error as one sentence that never quotes a secret's value."""
    path = ".".join(str(p) for p in err.absolute_path) or "(document)"
    secret = "password" in [str(p) for p in err.absolute_path] or "mqttPassword" in [str(p) for p in err.absolute_path]
    v = err.validator
    if secret:
        return f"{path}: a secret must be {{fromEnv: VAR}} or {{fromFile: /path}}; literal values are not allowed"
    if v == "additionalProperties":
        extra = sorted(set(err.instance) - set(err.schema.get("properties", {})))
        return f"{path}: unknown field{'s' if len(extra) > 1 else ''} {', '.join(map(repr, extra))}"
    if v == "required":
        return f"{path}: {err.message}"
    if v == "oneOf" and isinstance(err.instance, dict):
        return f"{path}: does not match any allowed form (check its fields)"
    msg = err.message
    if len(msg) > 200:
        msg = msg[:200] + "..."
    return f"{path}: {msg}"


# Characters XML 1.0 cannot hold at all, plus CR, which every XML parser reads back as LF (so a
# description holding one would show as drift forever). Every string of a libvirt kind ends up in XML.
_NOT_IN_XML = re.compile("[\x00-\x08\x0b\x0c\x0d\x0e-\x1f\ud800-\udfff\ufffe\uffff]")


def _xml_unsafe(data: Any, path: tuple = ()) -> tuple[tuple, str] | None:
    """The path of the first string (key or value) that libvirt's XML cannot hold unchanged, and why."""
    if isinstance(data, str):
        m = _NOT_IN_XML.search(data)
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


def _kind_modules():
    from .kinds.registry import BY_NAME
    return BY_NAME


def parse_document(data: Any, node: yaml.Node, file: str) -> Resource:
    line = _start_line(node)
    if not isinstance(data, dict):
        raise ManifestError(f"a document must be a mapping, not {type(data).__name__}", file=file, line=line)
    kind = data.get("kind")
    meta = data.get("metadata")
    name = meta.get("name") if isinstance(meta, dict) else None
    kname = name if isinstance(name, str) else None
    if data.get("apiVersion") != "reconciler/v1":
        raise ManifestError("apiVersion must be reconciler/v1", file=file,
                            line=_line_of(node, ("apiVersion",)), kind=kind if isinstance(kind, str) else None, name=kname)
    kinds = _kind_modules()
    if kind not in kinds:
        raise ManifestError(f"unknown kind {kind!r} (expected one of {', '.join(kinds)})", file=file,
                            line=_line_of(node, ("kind",)), name=kname)
    fast = fast_validator(kind)
    valid = False
    if fast is not None:
        try:
            valid = fast.is_valid(data)
        except (ValueError, TypeError, OverflowError):
            valid = False  # a value it cannot take (a huge integer): let jsonschema explain
    errors = [] if valid else sorted(validator(kind).iter_errors(data),
                                     key=lambda e: (len(list(e.absolute_path)), list(map(str, e.absolute_path))))
    if errors:
        # The deepest error is the most specific one.
        err = max(errors, key=lambda e: len(list(e.absolute_path)))
        where = tuple(err.absolute_path)
        if err.validator == "additionalProperties" and isinstance(err.instance, dict):
            # Point at the first unknown key itself, not at the mapping holding it.
            extra = [k for k in err.instance if k not in err.schema.get("properties", {})]
            if extra:
                where += (extra[0],)
        raise ManifestError(_schema_message(err, kind), file=file, line=_line_of(node, where),
                            kind=kind, name=kname)
    if kinds[kind].target == "libvirt" and not (isinstance(node, _LazyNode) and node.xml_safe):
        unsafe = _xml_unsafe(data)
        if unsafe:
            path, what = unsafe
            raise ManifestError(f"{'.'.join(map(str, path))}: contains {what}", file=file,
                                line=_line_of(node, path), kind=kind, name=kname)
    rules = _kind_modules()[kind]
    spec = data.get("spec") or {}
    for path, message in rules.check(name, spec):
        shown = ".".join(str(p) for p in path)
        raise ManifestError(f"{shown}: {message}" if path else message, file=file,
                            line=_line_of(node, path or ("metadata", "name")), kind=kind, name=name)
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
        raise ManifestError(e.message, file=file, line=_line_of(node, at), kind=kind, name=name) from None
    return Resource(id=ResourceId(kind, name), spec=normalised, labels=labels,
                    file=file, line=line, declared=frozenset(spec), node=node)


def read_texts(paths: Iterable[str]) -> list[tuple[str, str]]:
    """(file, text) of every manifest file below `paths`."""
    return [(file, read_text(file)) for file in find_files(paths)]


def parse_texts(texts: list[tuple[str, str]]) -> list[tuple[Any, yaml.Node, str]]:
    """(data, node, file) of every document: YAML well-formed and within the limits, not yet checked
    against any schema."""
    return [(data, node, file) for file, text in texts for data, node in load_documents(file, text)]


def read_documents(paths: Iterable[str]) -> list[tuple[Any, yaml.Node, str]]:
    return parse_texts(read_texts(paths))


def build(docs: list[tuple[Any, yaml.Node, str]]) -> list[Resource]:
    """Resources from documents, validated alone and together (unique names, references)."""
    resources: list[Resource] = []
    seen: dict[ResourceId, Resource] = {}
    for data, node, file in docs:
        r = parse_document(data, node, file)
        if r.id in seen:
            first = seen[r.id]
            raise ManifestError(f"declared twice (first at {first.where})", file=r.file, line=r.line,
                                kind=r.id.kind, name=r.id.name)
        seen[r.id] = r
        resources.append(r)
    check_references(resources)
    return resources


def load(paths: Iterable[str]) -> list[Resource]:
    """Every resource in `paths`, validated alone and together (unique names, references)."""
    return build(read_documents(paths))


def check_references(resources: list[Resource]) -> None:
    """References by name must name a declared object; a Disk's pool may also be one on the host."""
    declared = {r.id for r in resources}
    rules = _kind_modules()
    for r in resources:
        for ref_kind, ref_name, path in rules[r.id.kind].references(r.spec):
            if ResourceId(ref_kind, ref_name) not in declared:
                line = _line_of(r.node, path) if r.node is not None else r.line
                shown = ".".join(str(p) for p in path)
                raise ManifestError(f"{shown} refers to {ref_kind} {ref_name!r}, which no manifest declares",
                                    file=r.file, line=line, kind=r.id.kind, name=r.id.name)
