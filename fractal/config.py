# -*- test-case-name: tests.test_tap -*-
"""
The node configuration file: one TOML file shared by every node of a cluster.

Format
======

The file holds, at its top level, the same keys as the long options of
C{twistd fractal} (without the leading dashes, spelled exactly as the
options are: C{max-open-stores}, not C{max_open_stores}), and an array of
tables C{[[node]]}, one per node::

    app = "examples.mailbox:application"
    max-open-stores = 2000

    [[node]]
    id = "n1"
    listen = "tcp:7101:interface=127.0.0.1"
    client = "tcp:host=127.0.0.1:port=7101"
    peer = "tcp:host=127.0.0.1:port=7201"
    data = "/var/lib/fractal/n1"

    [[node]]
    id = "n2"
    listen = "tcp:7102:interface=127.0.0.1"
    client = "tcp:host=127.0.0.1:port=7102"

Each C{[[node]]} table has an C{id} (a non-empty string, unique in the file)
and may hold any option key, which then overrides the top-level value for
that node only, plus the keys that only make sense per node: C{client} (the
client endpoint description other parties use to reach the node) and
C{peer} (the endpoint description other nodes use to forward calls to it).
The node a process runs as is chosen with C{--node ID}.

Values have the TOML type of the option: strings for endpoints, paths and
names; integers for counts; booleans for flags.  A key the schema does not
know, a value of the wrong type, a duplicate node id or a file that is not
TOML is a L{ConfigError} that names the file and the key.

Precedence, highest first: the command line, the chosen C{[[node]]} table,
the top level of the file, the option's default.

The set of keys is not listed here: it is derived from the options class
(see L{schemaFromOptions}), so an option added to L{fractal.tap.Options} can
be written in the file at once.
"""

from __future__ import annotations

import difflib
import tomllib
from typing import Any, Callable, Mapping

from attrs import field, frozen
from twisted.python import usage
from twisted.python.filepath import FilePath

__all__ = [
    "NODE_ONLY_KEYS",
    "ConfigError",
    "NodeEntry",
    "FractalConfig",
    "schemaFromOptions",
    "parseConfig",
    "loadConfig",
]

NODE_ONLY_KEYS: Mapping[str, type] = {"client": str, "peer": str}
"""
Keys allowed only inside a C{[[node]]} table, with their types.
"""


class ConfigError(ValueError):
    """
    A configuration file cannot be used.  The message names the file and the
    offending key.
    """


def _typeName(kind: type) -> str:
    return {str: "a string", int: "an integer", float: "a number", bool: "a boolean"}.get(
        kind, kind.__name__
    )


def _checkValue(source: str, where: str, key: str, value: object, kind: type) -> object:
    """
    Check one value against its expected type.

    @return: the value, with an integer widened to C{float} where a number is
        expected.
    @raise ConfigError: if it has another type.
    """
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    # bool is a subclass of int: refuse true where a count is expected.
    if isinstance(value, bool) and kind is not bool:
        ok = False
    else:
        ok = isinstance(value, kind)
    if not ok:
        raise ConfigError(
            f"{source}: {where}{key!r} must be {_typeName(kind)}, "
            f"not {type(value).__name__} {value!r}"
        )
    return value


def _unknownKey(source: str, where: str, key: str, known: Mapping[str, type]) -> ConfigError:
    near = difflib.get_close_matches(key, list(known), n=1)
    if not near and key.replace("_", "-") in known:
        near = [key.replace("_", "-")]
    hint = f"; did you mean {near[0]!r}?" if near else ""
    return ConfigError(
        f"{source}: unknown key {where}{key!r}{hint} "
        f"(known keys: {', '.join(sorted(known))})"
    )


def _asDict(mapping: Mapping[str, Any]) -> dict[str, Any]:
    return dict(mapping)


@frozen
class NodeEntry:
    """
    One C{[[node]]} table of a configuration file.

    @ivar id: the node's id.
    @ivar settings: the table's other keys, already checked against the
        schema.
    """

    id: str
    settings: Mapping[str, Any] = field(converter=_asDict)

    @property
    def client(self) -> str | None:
        """
        The client endpoint description of the node, if given.
        """
        value: str | None = self.settings.get("client")
        return value

    @property
    def peer(self) -> str | None:
        """
        The peer endpoint description of the node, if given.
        """
        value: str | None = self.settings.get("peer")
        return value


@frozen
class FractalConfig:
    """
    A parsed, validated configuration file.

    @ivar source: where the configuration came from, for messages.
    @ivar settings: the top-level keys, already checked against the schema.
    @ivar nodes: the C{[[node]]} tables in file order.
    """

    source: str
    settings: Mapping[str, Any] = field(converter=_asDict)
    nodes: tuple[NodeEntry, ...] = ()

    def node(self, nodeId: str) -> NodeEntry:
        """
        The C{[[node]]} table whose id is C{nodeId}.

        @raise ConfigError: if there is none.
        """
        for entry in self.nodes:
            if entry.id == nodeId:
                return entry
        known = ", ".join(repr(entry.id) for entry in self.nodes) or "none"
        raise ConfigError(f"{self.source}: no [[node]] with id {nodeId!r} (known: {known})")

    def settingsFor(self, nodeId: str | None) -> dict[str, Any]:
        """
        The settings of one node: the top-level keys overridden by that
        node's table.

        @param nodeId: the node's id, or L{None} for the top level alone.
        @raise ConfigError: if there is no node C{nodeId}.
        """
        merged = dict(self.settings)
        if nodeId is not None:
            merged.update(self.node(nodeId).settings)
        return merged


def schemaFromOptions(
    options: type[usage.Options], exclude: tuple[str, ...] = ("config", "node")
) -> dict[str, type]:
    """
    The keys a configuration file may hold, derived from a
    L{usage.Options} subclass: each long parameter is a key whose type is
    given by its coercion function (C{int}, C{float}, or a string
    otherwise), and each flag is a boolean key.

    @param options: the options class.
    @param exclude: long option names that have no place in a file.
    """
    schema: dict[str, type] = {}
    for spec in getattr(options, "optParameters", []):
        name = spec[0]
        coerce: Callable[[str], object] | None = spec[4] if len(spec) > 4 else None
        kind: type = str
        if coerce is int or getattr(coerce, "configType", None) is int:
            kind = int
        elif coerce is float or getattr(coerce, "configType", None) is float:
            kind = float
        schema[name] = kind
    for spec in getattr(options, "optFlags", []):
        schema[spec[0]] = bool
    for name in exclude:
        schema.pop(name, None)
    schema.pop("help", None)
    schema.pop("version", None)
    return schema


def parseConfig(text: str, schema: Mapping[str, type], source: str = "<config>") -> FractalConfig:
    """
    Parse and validate the text of a configuration file.

    @param text: the TOML text.
    @param schema: the allowed keys and their types (see L{schemaFromOptions}).
    @param source: a name for the text in error messages, usually its path.
    @raise ConfigError: if the text is not TOML or breaks the format.
    """
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"{source}: not valid TOML: {e}") from None
    settings: dict[str, Any] = {}
    nodes: list[NodeEntry] = []
    for key, value in document.items():
        if key == "node":
            if not isinstance(value, list) or not all(isinstance(t, dict) for t in value):
                raise ConfigError(
                    f"{source}: 'node' must be an array of tables, written [[node]]"
                )
            continue
        if key not in schema:
            raise _unknownKey(source, "", key, schema)
        settings[key] = _checkValue(source, "", key, value, schema[key])
    perNode = dict(schema)
    perNode.update(NODE_ONLY_KEYS)
    seen: set[str] = set()
    for index, table in enumerate(document.get("node", [])):
        where = f"[[node]] #{index + 1}: "
        nodeId = table.get("id")
        if not isinstance(nodeId, str) or not nodeId:
            raise ConfigError(f"{source}: {where}'id' must be a non-empty string")
        where = f"[[node]] {nodeId!r}: "
        if nodeId in seen:
            raise ConfigError(f"{source}: {where}id used by more than one [[node]]")
        seen.add(nodeId)
        nodeSettings: dict[str, Any] = {}
        for key, value in table.items():
            if key == "id":
                continue
            if key not in perNode:
                raise _unknownKey(source, where, key, perNode)
            nodeSettings[key] = _checkValue(source, where, key, value, perNode[key])
        nodes.append(NodeEntry(nodeId, nodeSettings))
    return FractalConfig(source, settings, tuple(nodes))


def loadConfig(path: FilePath[str], schema: Mapping[str, type]) -> FractalConfig:
    """
    Read, parse and validate a configuration file.

    @param path: the file.
    @param schema: the allowed keys and their types.
    @raise ConfigError: if the file cannot be read or is not valid.
    """
    try:
        raw = path.getContent()
    except OSError as e:
        raise ConfigError(f"{path.path}: cannot read configuration file: {e.strerror}") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise ConfigError(f"{path.path}: configuration file is not UTF-8") from None
    return parseConfig(text, schema, path.path)
