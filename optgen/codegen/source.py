"""Spec files as located YAML: every value keeps the file, line and column it came from.

Spec errors must point at the offending line, so the YAML is composed into nodes (which carry
marks) and converted to plain Python values here, recording the location of every value by its
path (e.g. ``("update", 2)``).  Only YAML's safe types are built; anchors/aliases are refused so a
small file cannot expand into a huge one.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

MAX_SPEC_BYTES = 256 * 1024
MAX_DEPTH = 32  # levels of YAML nesting a spec may have


@dataclass(frozen=True)
class Location:
    file: str
    line: int  # 1-based
    column: int  # 1-based
    # For the start of an expression: the (line, column) of each character of its text, so that
    # shifted() lands on the right line of a folded (multi-line) or block scalar.
    chars: tuple[tuple[int, int], ...] | None = field(default=None, compare=False, repr=False)

    def shifted(self, columns: int) -> Location:
        if self.chars:
            if columns < len(self.chars):
                line, column = self.chars[max(columns, 0)]
                return Location(self.file, line, column)
            line, column = self.chars[-1]
            return Location(self.file, line, column + columns - len(self.chars) + 1)
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


class SpecWarning(UserWarning):
    """A valid spec that is likely wrong (e.g. a quantized state with zero in its table that the
    update divides by — the zero-point problem)."""


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

    @functools.cached_property
    def lines(self) -> list[str]:
        return self.text.splitlines()

    def key_at(self, *path: Any) -> Location:
        """The location of the mapping key that names the value at ``path``."""
        return self.locations.get(("key",) + tuple(path), self.at(*path))

    def expression_at(self, *path: Any) -> Location:
        """Where the text of the scalar at ``path`` starts (after an opening quote or a block
        scalar's header), carrying the source position of each character of the text."""
        where = self.at(*path)
        lines = self.lines
        if not 0 < where.line <= len(lines):
            return where
        line = lines[where.line - 1]
        start = (where.line - 1, where.column - 1)
        first = line[where.column - 1 : where.column]
        if first and first in "\"'":
            start = (where.line - 1, where.column)
        elif first and first in "|>":
            start = (where.line, 0)
        where = Location(self.file, start[0] + 1, start[1] + 1)
        value: Any = self.value
        for key in path:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                return where
        if not isinstance(value, str) or len(value) > 10_000:
            return where
        chars = _trace(lines, start, value.rstrip())
        return Location(where.file, where.line, where.column, chars) if chars else where


def _trace(lines: list[str], start: tuple[int, int], value: str) -> tuple[tuple[int, int], ...] | None:
    """The (line, column) of each character of a scalar's ``value``, matched against the source
    from ``start`` on (skipping indentation and folded line breaks); None if it does not match,
    e.g. when the scalar has escapes."""
    out = []
    row, col = start
    for char in value:
        while True:
            if row >= len(lines):
                return None
            text = lines[row]
            if col >= len(text):  # the line break
                if char in " \n":
                    out.append((row + 1, col + 1))
                    row, col = row + 1, 0
                    break
                row, col = row + 1, 0
            elif text[col] == char:
                out.append((row + 1, col + 1))
                col += 1
                break
            elif text[col] in " \t":
                col += 1
            else:
                return None
    return tuple(out)


def load_document(text: str, file: str) -> Document:
    if len(text.encode()) > MAX_SPEC_BYTES:
        raise SpecError(f"spec is larger than {MAX_SPEC_BYTES // 1024} KiB", Location(file, 1, 1))
    try:
        root = yaml.compose(text, Loader=_NestLimitedLoader)
    except yaml.MarkedYAMLError as err:
        mark = err.problem_mark or err.context_mark
        problem = err.problem or err.context
        if isinstance(err, yaml.scanner.ScannerError) and err.context_mark and err.problem:
            # The scanner gives up after the token that is wrong (a key without its ':', an unclosed
            # quote): point at where that token starts, not at the following line or the end.
            mark, problem = err.context_mark, f"{err.problem} ({err.context})"
        where = Location(file, mark.line + 1, mark.column + 1) if mark else Location(file, 1, 1)
        raise SpecError(f"YAML syntax error: {problem}", where) from None
    except _TooDeep as err:
        where = Location(file, err.mark.line + 1, err.mark.column + 1)
        raise SpecError(f"YAML nesting is too deep (more than {MAX_DEPTH} levels)", where) from None
    except yaml.YAMLError as err:
        raise SpecError(f"YAML error: {err}", Location(file, 1, 1)) from None
    except RecursionError:
        raise SpecError("YAML nesting is too deep", Location(file, 1, 1)) from None
    if root is None:
        raise SpecError("spec is empty", Location(file, 1, 1), "a spec is a YAML mapping; see docs/spec-language.md")
    locations: dict[Path_, Location] = {}
    value = _convert(root, (), file, locations, set(), 0)
    return Document(value, file, text, locations)


class _TooDeep(Exception):
    def __init__(self, mark: yaml.Mark):
        self.mark = mark


class _NestLimitedLoader(yaml.SafeLoader):
    """Refuses a collection nested deeper than _convert allows before composing into it: the
    composer recurses per level, and 5000 '[' took 1.7 s to reach a RecursionError."""

    nesting = 0

    def compose_node(self, parent, index):
        collection = self.check_event(yaml.SequenceStartEvent, yaml.MappingStartEvent)
        if collection:
            self.nesting += 1
            if self.nesting > MAX_DEPTH + 1:  # the root mapping is level 0 of _convert's count
                raise _TooDeep(self.peek_event().start_mark)
        try:
            return super().compose_node(parent, index)
        finally:
            if collection:
                self.nesting -= 1


def read_document(path: str | Path) -> Document:
    path = Path(path)
    try:
        with path.open("rb") as stream:  # bounded: a spec (or an otherwise: path) may name a device
            data = stream.read(MAX_SPEC_BYTES + 1)
    except OSError as err:
        raise SpecError(f"cannot read spec: {err.strerror}", Location(str(path), 1, 1)) from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise SpecError("spec is not UTF-8 text", Location(str(path), 1, 1)) from None
    return load_document(text, str(path))


_scalar_constructor = yaml.SafeLoader(stream="")
_SEQ_TAG = "tag:yaml.org,2002:seq"
_MAP_TAG = "tag:yaml.org,2002:map"


def _problem(err: Exception) -> str:
    """One line: a marked YAML error without its source excerpt."""
    text = err.problem if isinstance(err, yaml.MarkedYAMLError) and err.problem else str(err)
    return (text.splitlines() or [type(err).__name__])[0]


def _convert(node: yaml.Node, path: Path_, file: str, locations: dict, seen: set[int], depth: int) -> Any:
    where = Location(file, node.start_mark.line + 1, node.start_mark.column + 1)
    locations[path] = where
    if depth > MAX_DEPTH:
        raise SpecError(f"YAML nesting is too deep (more than {MAX_DEPTH} levels)", where)
    if id(node) in seen:
        raise SpecError("YAML anchors and aliases are not supported in specs", where)
    seen.add(id(node))
    if isinstance(node, yaml.ScalarNode):
        try:
            return _scalar_constructor.construct_object(node, deep=True)
        except Exception as err:  # any failure of a safe constructor: !!int x, an empty !!float, !!python/name:...
            raise SpecError(f"invalid YAML value: {_problem(err)}", where) from None
    if node.tag not in (_SEQ_TAG, _MAP_TAG):  # e.g. !!python/object/apply:os.system [...] or !!set
        raise SpecError(f"unsupported YAML tag {node.tag!r}", where, "specs use plain lists and mappings")
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
            key_where = Location(file, key_node.start_mark.line + 1, key_node.start_mark.column + 1)
            try:
                key = _scalar_constructor.construct_object(key_node)
            except Exception as err:  # as for values
                raise SpecError(f"invalid YAML key: {_problem(err)}", key_where) from None
            key = key if isinstance(key, str) else str(key)
            if key in result:
                raise SpecError(f"duplicate key '{key}'", key_where)
            locations[("key",) + path + (key,)] = key_where
            result[key] = _convert(value_node, path + (key,), file, locations, seen, depth + 1)
        return result
    raise SpecError("unsupported YAML node", where)  # pragma: no cover - yaml has only three node kinds
