"""Hardened YAML loading: the spec file's text (its size, UTF-8), plain YAML values only with no key
given twice, and the parsed tree's size, depth and numbers checked before anything walks it."""

from __future__ import annotations

import math
from collections.abc import Hashable
from pathlib import Path
from typing import Any

import yaml

from study.errors import first_line
from sweeps.spec.checks import _show
from sweeps.spec.model import SpecError

_MAX_BYTES = 1_000_000
_MAX_VALUES = 100_000  # values in the parsed file, aliases expanded
_MAX_DEPTH = 32


def _read_text(path: Path, where: str) -> str:
    """The spec's text: a readable UTF-8 file of at most _MAX_BYTES bytes."""
    if path.is_dir():
        raise SpecError(f"{where}: a folder, not a spec file")
    try:
        with path.open("rb") as f:
            data = f.read(_MAX_BYTES + 1)
    except OSError as err:
        raise SpecError(f"{where}: cannot read the spec ({err.strerror or err})") from err
    if len(data) > _MAX_BYTES:
        raise SpecError(f"{where}: larger than {_MAX_BYTES // 1_000_000} MB; a spec is a short text file")
    nul = data.find(b"\0")
    if nul >= 0:
        raise SpecError(f"{where}: a NUL byte at offset {nul}: a binary file, not a YAML spec")
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise SpecError(f"{where}: not UTF-8 text (byte 0x{data[err.start]:02x} at offset "
                        f"{err.start}); a spec is a YAML text file in UTF-8") from None


class _Refused(yaml.YAMLError):
    """YAML that a spec may not hold; the message is the whole problem."""


_Loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
_PLAIN_TAGS = {f"tag:yaml.org,2002:{name}" for name in ("null", "bool", "int", "float", "str", "seq",
                                                       "map")}
_UNRESOLVED = {"tag:yaml.org,2002:timestamp", "tag:yaml.org,2002:value"}  # dates and `=` stay text


class _SpecLoader(_Loader):
    """Safe YAML with plain values only, refusing a key given twice in a mapping."""

    yaml_constructors = {tag: construct for tag, construct in _Loader.yaml_constructors.items()
                         if tag in _PLAIN_TAGS}
    yaml_implicit_resolvers = {first: [(tag, regexp) for tag, regexp in resolvers
                                       if tag not in _UNRESOLVED]
                               for first, resolvers in _Loader.yaml_implicit_resolvers.items()}

    def construct_mapping(self, node, deep=False):
        marks: dict[Any, Any] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key, mark = self.construct_object(key_node, deep=True), key_node.start_mark
            if not isinstance(key, Hashable):
                continue  # the base class refuses it
            if key in marks:
                first = marks[key]
                at = f", columns {first.column + 1} and {mark.column + 1}" if first.line == mark.line else ""
                raise _Refused(f"duplicated key {key!r} at line {mark.line + 1} (first at line "
                               f"{first.line + 1}{at})")
            marks[key] = mark
        return super().construct_mapping(node, deep)

    def refuse_tag(self, node):
        tag = node.tag.replace("tag:yaml.org,2002:", "!!")
        raise _Refused(f"line {node.start_mark.line + 1}: the tag {tag} is not allowed; a spec holds "
                       f"plain values (text, numbers, true/false, null, lists, mappings)")


_SpecLoader.yaml_constructors[None] = _SpecLoader.refuse_tag


def _load_yaml(text: str, where: str) -> Any:
    try:
        return yaml.load(text, Loader=_SpecLoader)
    except _Refused as err:
        raise SpecError(f"{where}: {err}") from None
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        at = f" at line {mark.line + 1}" if mark else ""
        problem = getattr(err, "problem", None) or str(err)
        raise SpecError(f"{where}: not valid YAML{at}: {first_line(problem)}") from None
    except RecursionError:
        raise SpecError(f"{where}: not valid YAML: nested too deeply") from None
    except ValueError as err:  # e.g. an integer of more digits than Python converts
        raise SpecError(f"{where}: not valid YAML: {first_line(err)}") from None


def _check_tree(raw: Any, fail) -> None:
    """Refuse, before anything else walks the data: more than _MAX_VALUES values once aliases are
    expanded, an alias that contains itself, nesting deeper than _MAX_DEPTH, keys that are not
    text, numbers that are not finite."""
    budget = [_MAX_VALUES]

    def walk(value: Any, path: str, ancestors: frozenset[int]) -> None:
        budget[0] -= 1
        if budget[0] < 0:
            fail("", f"more than {_MAX_VALUES} values once its aliases are expanded (an alias "
                     f"bomb?); a spec holds a few hundred")
        if isinstance(value, float) and not math.isfinite(value):
            fail(path, f"{value} is not a finite number")
        if not isinstance(value, dict | list):
            return
        if id(value) in ancestors:
            fail(path, "contains itself (a recursive alias)")
        if len(ancestors) == _MAX_DEPTH:
            fail(path, f"nested deeper than {_MAX_DEPTH} levels")
        inner = ancestors | {id(value)}
        if isinstance(value, list):
            for index, item in enumerate(value):
                walk(item, f"{path}[{index}]", inner)
            return
        for key, item in value.items():
            if not isinstance(key, str):
                fail(path, f"keys are text, got {_show(key)}")
            walk(item, f"{path}.{key}" if path else key, inner)

    walk(raw, "", frozenset())
