"""Reading mmproxy's YAML with line numbers, and the configuration's one error type.

The file is composed (not loaded) so that every key and value keeps its line
number: administrators get "/etc/mmproxy/ssh.yaml:7: mark: ..." rather than a
bare "invalid value".  Aliases and deep nesting are refused before anything is
built, since the files are read as root at boot.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any, NoReturn

import yaml
from yaml.constructor import SafeConstructor
from yaml.events import AliasEvent, Event
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode
from yaml.resolver import Resolver

from mmproxy.files import FileRefused, read_small_file

__all__ = [
    "MAX_DEPTH",
    "ConfigError",
    "Invalid",
    "Value",
    "Where",
    "fail",
    "implicit_tag",
    "read_mapping",
    "value_from_node",
    "value_from_python",
]


class ConfigError(Exception):
    """A configuration problem, worded for the administrator who has to fix it.

    str() reads like a compiler message: "FILE:LINE: KEY: what is wrong; fix".
    Errors from a command-line override name the option (`origin`) instead.
    """

    def __init__(
        self,
        message: str,
        *,
        path: str | None = None,
        line: int | None = None,
        key: str | None = None,
        origin: str | None = None,
        column: int | None = None,
    ) -> None:
        self.message = message
        self.path = path
        self.line = line
        self.key = key
        self.origin = origin
        self.column = column
        super().__init__(self._format())

    def _format(self) -> str:
        parts = [part for part in (self._location(), self.key, self.message) if part]
        return ": ".join(parts)

    def _location(self) -> str | None:
        if self.origin is not None:
            return self.origin
        if self.path is None:
            return None
        location = self.path
        if self.line is not None:
            location += f":{self.line}"
            if self.column is not None:
                location += f":{self.column}"
        return location


# --------------------------------------------------------------------------
# Values with their origin


@dataclass(frozen=True, slots=True)
class Where:
    """Where a value came from: a file line, or a command-line option."""

    path: str | None
    line: int | None = None
    origin: str | None = None


@dataclass(frozen=True, slots=True)
class Value:
    """A YAML (or override) value before validation, with its location.

    For sequences `data` is a list of Value so that each item keeps its line.
    `text` is the scalar as written: YAML reads `yes` as true and `0123` as 83,
    and only the text tells us that happened.
    """

    data: object
    where: Where
    kind: str = "scalar"  # "scalar", "sequence" or "mapping"
    text: str | None = None
    quoted: bool = False


class Invalid(Exception):
    """Raised by value parsers; the loader turns it into a located ConfigError."""

    def __init__(self, message: str, where: Where) -> None:
        super().__init__(message)
        self.message = message
        self.where = where


def fail(value: Value, message: str) -> NoReturn:
    raise Invalid(message, value.where)


def _construct_scalar(node: ScalarNode, where: Where) -> object:
    try:
        return SafeConstructor().construct_object(node)
    except yaml.YAMLError as exc:
        problem = getattr(exc, "problem", None) or str(exc)
        raise Invalid(f"cannot read this value: {problem}", where) from None


def value_from_node(node: Node, path: str) -> Value:
    where = Where(path, node.start_mark.line + 1)
    if isinstance(node, SequenceNode):
        return Value([value_from_node(item, path) for item in node.value], where, "sequence")
    if isinstance(node, MappingNode):
        return Value(None, where, "mapping")
    assert isinstance(node, ScalarNode)
    data = _construct_scalar(node, where)
    return Value(data, where, text=node.value, quoted=node.style in ("'", '"'))


def implicit_tag(text: str) -> str:
    """The tag YAML gives `text` written unquoted (int, bool, str...)."""
    tag = Resolver().resolve(ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
    return str(tag)


def _resolve_plain(text: str, where: Where) -> Value:
    # A command-line string is read as if written unquoted in the YAML file,
    # so "--mark 7" is the integer 7 and goes through the same checks.
    tag = implicit_tag(text)
    data = _construct_scalar(ScalarNode(tag, text), where)
    return Value(data, where, text=text)


def value_from_python(value: object, where: Where) -> Value:
    if isinstance(value, list | tuple):
        return Value([value_from_python(item, where) for item in value], where, "sequence")
    if isinstance(value, dict):
        return Value(None, where, "mapping")
    if isinstance(value, str):
        return _resolve_plain(value, where)
    return Value(value, where)


# --------------------------------------------------------------------------
# Reading the file


def _read_text(path: str) -> str:
    try:
        data = read_small_file(path)
    except FileRefused as exc:
        raise ConfigError(f"cannot read the configuration file: {exc}", path=path) from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data[: exc.start].count(b"\n") + 1
        raise ConfigError(
            f"not UTF-8 text (bad byte 0x{data[exc.start]:02x})", path=path, line=line
        ) from None


def _syntax_hint(source_line: str) -> str:
    if "\t" in source_line:
        return "; YAML does not allow tabs for indentation, use spaces"
    if "[" in source_line and "]:" in source_line:
        return "; quote values that start with '[', e.g. ipv6: \"[::1]:22\""
    return ""


MAX_DEPTH = 16  # nesting levels; mmproxy's settings use two


class _Refused(Exception):
    """Valid YAML that mmproxy will not read (an alias, deep nesting), and where."""

    def __init__(self, problem: str, event: Event) -> None:
        super().__init__(problem)
        self.problem = problem
        mark = event.start_mark
        self.line = None if mark is None else mark.line + 1
        self.column = None if mark is None else mark.column + 1


class _StrictLoader(yaml.SafeLoader):
    """SafeLoader without aliases and with a nesting limit. Files are read as root at
    boot: an alias bomb ("billion laughs") would exhaust memory, and deep nesting would
    raise RecursionError, stopping the generator before the next file."""

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._depth = 0

    def compose_node(self, parent: Node | None, index: Any) -> Node | None:
        event = self.peek_event()  # type: ignore[no-untyped-call]
        if isinstance(event, AliasEvent):
            raise _Refused(
                f"YAML aliases (*{event.anchor}) are not allowed here; write the value out",
                event,
            )
        self._depth += 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(
                    f"nested more than {MAX_DEPTH} levels deep; mmproxy's settings are "
                    "plain values and lists",
                    event,
                )
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


def _compose(path: str, text: str) -> Node | None:
    try:
        return yaml.compose(text, Loader=_StrictLoader)
    except _Refused as exc:
        raise ConfigError(exc.problem, path=path, line=exc.line, column=exc.column) from None
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        problem = exc.problem or "invalid YAML"
        if exc.context:
            problem = f"{problem} ({exc.context})"
        if mark is None:
            raise ConfigError(f"YAML syntax error: {problem}", path=path) from None
        lines = text.splitlines()
        source = lines[mark.line] if mark.line < len(lines) else ""
        raise ConfigError(
            f"YAML syntax error: {problem}{_syntax_hint(source)}",
            path=path,
            line=mark.line + 1,
            column=mark.column + 1,
        ) from None
    except yaml.YAMLError as exc:
        # ReaderError (control characters) carries a character offset, not a mark.
        position = getattr(exc, "position", None)
        line = text[:position].count("\n") + 1 if isinstance(position, int) else None
        reason = getattr(exc, "reason", None) or str(exc)
        character = getattr(exc, "character", None)
        if isinstance(character, str):  # PyYAML gives a code point or a character
            character = ord(character)
        if isinstance(character, int):
            reason = f"unacceptable character #x{character:04x}: {reason}"
        raise ConfigError(f"YAML syntax error: {reason}", path=path, line=line) from None
    except (ValueError, OverflowError) as exc:
        # PyYAML lets some escapes through unchecked: "\U4DDDDDDD" is beyond Unicode.
        raise ConfigError(f"YAML syntax error: {exc}", path=path) from None


def read_mapping(path: str) -> Iterator[tuple[str, int, Node]]:
    """The top-level `key: value` pairs of the file at `path`, in file order, as (name,
    line, value node). Lazy, so that a bad key is reported after the lines before it."""
    root = _compose(path, _read_text(path))
    if root is None:
        raise ConfigError(
            'the file is empty; expected settings such as listen: "0.0.0.0:2222" '
            "(see example.yaml)",
            path=path,
        )
    if not isinstance(root, MappingNode):
        kind = "a list" if isinstance(root, SequenceNode) else "a single value"
        raise ConfigError(
            f"expected settings as 'key: value' lines at the top level, got {kind}",
            path=path,
            line=root.start_mark.line + 1,
        )
    for key_node, value_node in root.value:
        yield _key_name(path, key_node), key_node.start_mark.line + 1, value_node


def _key_name(path: str, node: Node) -> str:
    if not isinstance(node, ScalarNode):
        raise ConfigError(
            "expected a setting name before ':', got a list or mapping",
            path=path,
            line=node.start_mark.line + 1,
        )
    # The text as written: YAML would turn a key `on:` into True.
    return str(node.value)
