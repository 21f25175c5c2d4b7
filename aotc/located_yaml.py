"""Safe YAML loading that keeps the line of every value, for errors that point at the input."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from aotc.errors import Location, ManifestError

_PLAIN_TAGS = {
    "tag:yaml.org,2002:str",
    "tag:yaml.org,2002:int",
    "tag:yaml.org,2002:float",
    "tag:yaml.org,2002:bool",
    "tag:yaml.org,2002:null",
}
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


@dataclass(frozen=True)
class Node:
    """A YAML value with its place: `value` is a dict[str, Node], a list[Node] or a scalar."""

    value: Any
    path: Path
    line: int
    key: str

    @property
    def location(self) -> Location:
        return Location(self.path, self.line, self.key)

    def error(self, message: str) -> ManifestError:
        return ManifestError(message, self.location)

    def expect(self, kind: type | tuple[type, ...], what: str) -> Any:
        """The plain value if it has the expected Python type, else a located error."""
        value = self.value
        if isinstance(value, Node):  # pragma: no cover - values are never nested Nodes
            value = value.value
        ok = isinstance(value, kind) and not (
            isinstance(value, bool) and bool not in _as_tuple(kind)
        )
        if not ok:
            raise self.error(f"expected {what}, got {_describe(self)}")
        return value

    def mapping(self) -> dict[str, Node]:
        return self.expect(dict, "a mapping")

    def sequence(self, *, non_empty: bool = True) -> list[Node]:
        items = self.expect(list, "a list")
        if non_empty and not items:
            raise self.error("must not be an empty list")
        return items

    def plain(self) -> Any:
        """The value with every Node unwrapped (for recording, not validation)."""
        if isinstance(self.value, dict):
            return {k: v.plain() for k, v in self.value.items()}
        if isinstance(self.value, list):
            return [v.plain() for v in self.value]
        return self.value


def load(path: Path, text: str | None = None) -> Node:
    """Parse `path` into Nodes; only plain YAML types are allowed (no tags, no duplicate keys)."""
    if text is None:
        try:
            text = path.read_text(encoding="utf-8")
        except OSError as exc:
            raise ManifestError(f"cannot read manifest: {exc.strerror}") from exc
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark else 1
        problem = getattr(exc, "problem", None) or str(exc)
        raise ManifestError(f"invalid YAML: {problem}", Location(path, line, "")) from exc
    if root is None:
        raise ManifestError("the manifest is empty", Location(path, 1, ""))
    return _convert(root, path, "")


def _convert(node: yaml.Node, path: Path, key: str) -> Node:
    line = node.start_mark.line + 1
    if isinstance(node, yaml.MappingNode) and node.tag == _MAP_TAG:
        return Node(_convert_mapping(node, path, key), path, line, key)
    if isinstance(node, yaml.SequenceNode) and node.tag == _SEQ_TAG:
        items = [_convert(item, path, f"{key}[{i}]") for i, item in enumerate(node.value)]
        return Node(items, path, line, key)
    if isinstance(node, yaml.ScalarNode) and node.tag in _PLAIN_TAGS:
        value = yaml.SafeLoader("").construct_object(node)
        return Node(value, path, line, key)
    raise ManifestError(
        f"YAML tag {node.tag!r} is not allowed: use plain strings, numbers, lists and mappings",
        Location(path, line, key),
    )


def _convert_mapping(node: yaml.MappingNode, path: Path, key: str) -> dict[str, Node]:
    result: dict[str, Node] = {}
    for key_node, value_node in node.value:
        if not (isinstance(key_node, yaml.ScalarNode) and key_node.tag == "tag:yaml.org,2002:str"):
            where = Location(path, key_node.start_mark.line + 1, key)
            raise ManifestError(f"keys must be plain strings, got {key_node.value!r}", where)
        name = key_node.value
        child_key = f"{key}.{name}" if key else name
        if name in result:
            where = Location(path, key_node.start_mark.line + 1, child_key)
            raise ManifestError(f"duplicate key {name!r}", where)
        result[name] = _convert(value_node, path, child_key)
    return result


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def _describe(node: Node) -> str:
    value = node.value
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"
