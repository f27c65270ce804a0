"""Spec files as located YAML: every value keeps the file, line and column it came from.

Spec errors must point at the offending line, so the YAML is composed into nodes (which carry
marks) and converted to plain Python values here, recording the location of every value by its
path (e.g. ``("update", 2)``).  Only YAML's safe types are built; anchors/aliases are refused so a
small file cannot expand into a huge one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

MAX_SPEC_BYTES = 256 * 1024


@dataclass(frozen=True)
class Location:
    file: str
    line: int  # 1-based
    column: int  # 1-based

    def shifted(self, columns: int) -> Location:
        return Location(self.file, self.line, self.column + columns)

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


class SpecError(ValueError):
    """An invalid spec: says where (file:line:column), what is wrong and what would be valid."""

    def __init__(self, message: str, where: Location | None = None, hint: str | None = None):
        self.message = message
        self.where = where
        self.hint = hint
        text = f"{where}: {message}" if where else message
        if hint:
            text += f" ({hint})"
        super().__init__(text)

    @property
    def line(self) -> int | None:
        return self.where.line if self.where else None


Path_ = tuple[Any, ...]


@dataclass
class Document:
    """A parsed spec file: its plain value plus the location of every sub-value by path."""

    value: Any
    file: str
    text: str
    locations: dict[Path_, Location]

    def at(self, *path: Any) -> Location:
        """The location of the value at ``path`` (or of its closest located parent)."""
        path = tuple(path)
        while path not in self.locations and path:
            path = path[:-1]
        return self.locations.get(path, Location(self.file, 1, 1))

    def key_at(self, *path: Any) -> Location:
        """The location of the mapping key that names the value at ``path``."""
        return self.locations.get(("key",) + tuple(path), self.at(*path))


def load_document(text: str, file: str) -> Document:
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError(f"spec is larger than {MAX_SPEC_BYTES // 1024} KiB", Location(file, 1, 1))
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        raise SpecError(f"YAML syntax error: {err.problem or err.context}", where) from None
    except yaml.YAMLError as err:
        raise SpecError(f"YAML error: {err}", Location(file, 1, 1)) from None
    except RecursionError:
        raise SpecError("YAML nesting is too deep", Location(file, 1, 1)) from None
    if root is None:
        raise SpecError("spec is empty", Location(file, 1, 1), "a spec is a YAML mapping; see docs/spec-language.md")
    locations: dict[Path_, Location] = {}
    value = _convert(root, (), file, locations, set(), 0)
    return Document(value, file, text, locations)


def read_document(path: str | Path) -> Document:
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as err:
        raise SpecError(f"cannot read spec: {err.strerror}", Location(str(path), 1, 1)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("spec is not UTF-8 text", Location(str(path), 1, 1)) from None
    return load_document(text, str(path))


_scalar_constructor = yaml.SafeLoader(stream="")


def _convert(node: yaml.Node, path: Path_, file: str, locations: dict, seen: set[int], depth: int) -> Any:
    where = Location(file, node.start_mark.line + 1, node.start_mark.column + 1)
    locations[path] = where
    if depth > 32:
        raise SpecError("YAML nesting is too deep (more than 32 levels)", where)
    if id(node) in seen:
        raise SpecError("YAML anchors and aliases are not supported in specs", where)
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        try:
            return _scalar_constructor.construct_object(node, deep=True)
        except yaml.YAMLError as err:
            raise SpecError(f"invalid YAML value: {err}", where) from None
    if isinstance(node, yaml.SequenceNode):
        return [_convert(item, path + (i,), file, locations, seen, depth + 1) for i, item in enumerate(node.value)]
    if isinstance(node, yaml.MappingNode):
        result: dict[Any, Any] = {}
        for key_node, value_node in node.value:
            if not isinstance(key_node, yaml.ScalarNode):
                raise SpecError(
                    "mapping keys must be plain names",
                    Location(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1),
                )
            key = _scalar_constructor.construct_object(key_node)
            key = key if isinstance(key, str) else str(key)
            key_where = Location(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            if key in result:
                raise SpecError(f"duplicate key '{key}'", key_where)
            locations[("key",) + path + (key,)] = key_where
            result[key] = _convert(value_node, path + (key,), file, locations, seen, depth + 1)
        return result
    raise SpecError("unsupported YAML node", where)  # pragma: no cover - yaml has only three node kinds
