"""Manifests in, Resources out: `load(paths)` finds the files, reads their YAML (source.py) and
builds checked, normalised Resources (build.py). Nothing here touches a target."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterable

from ..errors import ManifestError
from ..model import Resource
from .build import build, build_one, schema_errors, schema_message, validator
from .source import MAX_DEPTH, MAX_FILE_BYTES, MAX_INT_DIGITS, MAX_NODES, Document, YamlSource, find_files, read_text


@dataclass(frozen=True)
class Loaded:
    """What a load found: the resources, and a digest of every file's name and text (saved plans
    compare it to know the manifests did not change between plan and apply)."""
    resources: tuple[Resource, ...]
    digest: str
    files: tuple[str, ...]


def documents(paths: Iterable[str]) -> tuple[list[Document], str, tuple[str, ...]]:
    """Every non-empty document below `paths`, the digest of the files, and the files."""
    source = YamlSource()
    docs: list[Document] = []
    h = hashlib.sha256()
    files = tuple(find_files(paths))
    for file in files:
        text = read_text(file)
        h.update(file.encode("utf-8", "surrogateescape") + b"\0" + text.encode("utf-8") + b"\0")
        docs.extend(source.documents(file, text))
    return docs, h.hexdigest(), files


def read(paths: Iterable[str]) -> Loaded:
    docs, digest, files = documents(paths)
    return Loaded(tuple(build(docs)), digest, files)


def load(paths: Iterable[str]) -> list[Resource]:
    """Every resource in `paths`, validated alone and together (unique names, references)."""
    return list(read(paths).resources)


def parse_document(data, file: str = "<test>") -> Resource:
    """One document's data as a Resource (tests and tools that build documents in code)."""
    import yaml
    text = yaml.safe_dump(data, sort_keys=False)
    docs = YamlSource().documents(file, text)
    return build_one(docs[0])


__all__ = ["Document", "Loaded", "ManifestError", "YamlSource", "build", "build_one", "documents", "find_files",
           "load", "parse_document", "read", "read_text", "schema_errors", "schema_message", "validator",
           "MAX_DEPTH", "MAX_FILE_BYTES", "MAX_INT_DIGITS", "MAX_NODES"]
