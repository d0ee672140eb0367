"""The fast YAML path (dicts straight from libyaml's events) must build exactly what PyYAML's safe
loader builds, or step aside for the node path; either way errors keep their exact lines."""
from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from reconciler import manifests
from reconciler.manifests import YamlSource

ROOT = Path(__file__).resolve().parent.parent
CORPUS = sorted(p for p in list(ROOT.glob("manifests/**/*.yaml")) + list(ROOT.glob("tests/**/*.yaml")))

TRICKY = {
    "plain": "a: 1\nb: [x, 'y', \"z\\t\"]\nc: {d: null, e: true, f: 1.5, g: 0x1F, h: 2024-01-02}\n",
    "multi-doc": "---\na: 1\n---\nb: 2\n...\n---\n- 1\n- 2\n",
    "block-scalars": "a: |\n  line one\n  line two\nb: >\n  folded\n  text\n",
    "anchors": "a: &x {k: v}\nb: *x\n",
    "merge": "base: &b {k: v}\nuse:\n  <<: *b\n  z: 1\n",
    "explicit-tags": "a: !!str 123\nb: !!int '7'\n",
    "duplicate-keys": "a: 1\na: 2\n",
    "scalar-doc": "--- just a string\n",
    "empty-docs": "---\n---\na: 1\n",
    "sexagesimal-and-octal": "a: 1:30\nb: 0o17\nc: 017\nd: +12\ne: .inf\nf: ~\n",
    "complex-key": "? [a, b]\n: c\n",
    "unicode": "name: \"\\u00e9t\\u00e9 ☃\"\nk: 'it''s'\n",
    "long-int": "a: " + "9" * 60 + "\n",
    "deep": "a:\n" + "".join("  " * i + "- \n" for i in range(1, 80)),
}


def _reference(text: str):
    try:
        return list(yaml.load_all(text, Loader=yaml.SafeLoader))
    except yaml.YAMLError:
        return "error"


@pytest.mark.parametrize("name", sorted(TRICKY))
def test_fast_path_builds_what_pyyaml_builds_or_steps_aside(name):
    text = TRICKY[name]
    fast = YamlSource()._fast(text)
    if fast is None:
        return  # the node path takes it, with every check it has
    assert [d for d, _ in fast] == _reference(text)


@pytest.mark.parametrize("path", CORPUS, ids=[str(p.relative_to(ROOT)) for p in CORPUS])
def test_fast_path_on_every_yaml_file_of_the_project(path):
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError:
        return
    fast = YamlSource()._fast(text)
    if fast is None:
        return
    assert [d for d, _ in fast] == _reference(text)
    nodes = [n for n in yaml.compose_all(text, Loader=yaml.SafeLoader) if n is not None]
    assert [line for _, line in fast] == [n.start_mark.line + 1 for n in nodes]


def test_common_manifests_take_the_fast_path_and_still_point_errors_at_their_line(tmp_path):
    f = tmp_path / "vm.yaml"
    f.write_text("apiVersion: reconciler/v1\nkind: VirtualMachine\nmetadata: {name: a}\n"
                 "spec:\n  memory: 64MiB\n  vcpus: 1\n  bogus: 3\n")
    assert YamlSource()._fast(f.read_text()) is not None
    with pytest.raises(manifests.ManifestError) as e:
        manifests.load([str(f)])
    assert e.value.line == 7 and "bogus" in str(e.value)


def test_the_specials_still_get_their_precise_errors(tmp_path):
    for text, line, words in (("a: 1\na: 2\n", 2, "duplicate key"),
                              ("a: " + "9" * 60 + "\n", 1, "digits")):
        f = tmp_path / "x.yaml"
        f.write_text(text)
        with pytest.raises(manifests.ManifestError) as e:
            manifests.load([str(f)])
        assert e.value.line == line and words in str(e.value)
