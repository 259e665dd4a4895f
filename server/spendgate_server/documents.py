"""YAML and JSON documents written by people (config and policy files), read within bounds.

Every file a user hands to spendgate (``serve --config``, ``config set``,
``policies set``, ``decide --config``) is read here, so one place bounds what a
document may be: its size, its nesting depth and how many values it expands to.
PyYAML and ``json`` build nested values recursively, so a document nested a few
thousand levels deep would raise RecursionError; here its depth is measured first,
iteratively (YAML's event stream, or a scan of the JSON text), and a document too
deep is refused with a one-line ConfigError naming the source. YAML aliases are
allowed (price tables share tiers with them), but the parsed value is walked once,
iteratively, and refused if it expands to more than MAX_DOCUMENT_VALUES values or
deeper than MAX_DOCUMENT_DEPTH: an alias of an alias of ... ("billion laughs") costs
nothing to parse and exponential time to print or traverse.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from spendgate_server.errors import ConfigError

__all__ = [
    "MAX_DOCUMENT_BYTES",
    "MAX_DOCUMENT_DEPTH",
    "MAX_DOCUMENT_VALUES",
    "parse_document",
    "read_document",
]

# Config and policy files are a few KiB; the largest policy set (100 patterns of 1 KiB) fits.
MAX_DOCUMENT_BYTES = 1 << 20
# The deepest spendgate document is 4 levels (policies → key rules → a rule → environments).
MAX_DOCUMENT_DEPTH = 32
# Values (scalars and collections) a document may expand to, aliases expanded.
MAX_DOCUMENT_VALUES = 100_000


def read_document(path: str, flag: str = "") -> Any:
    """Read and parse the file at ``path``: JSON when it ends in ``.json``, else YAML.

    Args:
        path: the file.
        flag: the option that named it (``--config``), for errors; empty for a positional.

    Raises:
        ConfigError: the file cannot be read, is not UTF-8, or parse_document refuses it.
    """
    source = f"{flag} {path}" if flag else path
    try:
        with Path(path).open("rb") as handle:
            data = handle.read(MAX_DOCUMENT_BYTES + 1)
    except OSError as exc:
        raise ConfigError(f"{flag + ': ' if flag else ''}cannot read {path}: {exc.strerror}") from exc
    if len(data) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_DOCUMENT_BYTES} bytes")
    try:
        text = data.decode()
    except UnicodeDecodeError as exc:
        raise ConfigError(f"{source} is not UTF-8 text: {exc.reason} at byte {exc.start}") from exc
    return parse_document(text, source, json_only=path.endswith(".json"))


def parse_document(text: str, source: str, *, json_only: bool = False) -> Any:
    """Parse ``text`` as JSON (``json_only``) or YAML (which also reads JSON).

    Args:
        text: the document.
        source: how errors name it (``--config rules.yaml``).
        json_only: parse as strict JSON (files ending in ``.json``).

    Raises:
        ConfigError: naming ``source`` and what is wrong: too large, nested deeper than
            MAX_DOCUMENT_DEPTH, expanding to more than MAX_DOCUMENT_VALUES values, or not
            valid YAML/JSON.
    """
    if len(text) > MAX_DOCUMENT_BYTES:
        raise ConfigError(f"{source}: larger than {MAX_DOCUMENT_BYTES} bytes")
    kind = "JSON" if json_only else "YAML/JSON"
    try:
        depth = _json_depth(text) if json_only else _yaml_depth(text)
        if depth > MAX_DOCUMENT_DEPTH:
            raise ConfigError(f"{source}: nested deeper than {MAX_DOCUMENT_DEPTH} levels")
        value = json.loads(text) if json_only else yaml.safe_load(text)
    except (ValueError, yaml.YAMLError) as exc:
        raise ConfigError(f"{source} is not valid {kind}: {' '.join(str(exc).split())}") from exc
    _check_expanded(value, source)
    return value


def _check_expanded(value: Any, source: str) -> None:
    """Walk ``value`` once, iteratively, as a consumer would see it (shared references expanded).

    Raises:
        ConfigError: more than MAX_DOCUMENT_VALUES values, or nested deeper than MAX_DOCUMENT_DEPTH.
    """
    stack: list[tuple[Any, int]] = [(value, 0)]
    seen = 0
    while stack:
        node, depth = stack.pop()
        seen += 1
        if seen > MAX_DOCUMENT_VALUES:
            raise ConfigError(
                f"{source}: expands to more than {MAX_DOCUMENT_VALUES} values (YAML aliases of aliases?)"
            )
        if isinstance(node, dict | list):
            if depth >= MAX_DOCUMENT_DEPTH:
                raise ConfigError(f"{source}: nested deeper than {MAX_DOCUMENT_DEPTH} levels")
            children = [*node.keys(), *node.values()] if isinstance(node, dict) else node
            stack.extend((child, depth + 1) for child in children)


def _yaml_depth(text: str) -> int:
    """The deepest nesting of collections, from the event stream (PyYAML parses it without recursion).

    Raises:
        yaml.YAMLError: the text is not YAML.
    """
    depth = deepest = 0
    for event in yaml.parse(text, Loader=yaml.SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DOCUMENT_DEPTH:
                break
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return deepest


def _json_depth(text: str) -> int:
    """The deepest nesting of arrays and objects, counting brackets outside strings."""
    depth = deepest = 0
    in_string = escaped = False
    for char in text:
        if in_string:
            if escaped:
                escaped = False
            elif char == "\\":
                escaped = True
            elif char == '"':
                in_string = False
        elif char == '"':
            in_string = True
        elif char in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_DOCUMENT_DEPTH:
                break
        elif char in "]}":
            depth -= 1
    return deepest
