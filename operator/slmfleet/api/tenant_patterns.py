"""The regular expressions and JSON Schemas a tenant writes (the `regex` and `jsonSchema` scorers of a
ModelRollout, and the per-case scorers of a dataset), and what of them is accepted.

Regular expressions are RE2's (google-re2), never Python's `re`: RE2 matches in time linear in the
text and the pattern, so no pattern can hold a thread, let alone the operator's event loop. RE2 has
no backreferences (`\\1`), lookaround (`(?=`, `(?!`, `(?<=`, `(?<!`), atomic groups or possessive
quantifiers, and spells Python's `\\Z` as `\\z`; a pattern using them is refused with RE2's own
reason. What differs from Python's `re` for patterns both accept: `\\d`, `\\w`, `\\s` and `\\b` are
ASCII only (`\\pL`, `\\p{Greek}` and `[[:alpha:]]` are there for more), and `$` without the multiline
flag matches at the very end only (not before a final newline). A pattern has at most
MAX_PATTERN_LENGTH characters, and its compiled form at most RE2_MAX_MEM bytes (RE2 refuses a larger
one, e.g. `(a{1000}){1000}`); matching past that budget falls back to RE2's slower, still linear,
matcher.

JSON Schemas are checked whole when they are parsed, before anything is scored:
- `$schema`, if given, is a dialect jsonschema knows (draft 3 to 2020-12);
- every `$ref`, `$dynamicRef` and `$recursiveRef` is local (`#...`): nothing is ever fetched;
- every `pattern`, and every key of `patternProperties`, is an RE2 pattern (as above);
- a `#/...` reference points somewhere in the schema (when no nested `$id` moves its base);
- the schema is valid against its dialect's metaschema, and nested at most MAX_SCHEMA_DEPTH deep.
The places looked at are every object of the schema except the values of `const`, `enum`,
`default` and `examples`, which are data: an unknown keyword's object is looked at too, since a
local `$ref` may point into it.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any, Protocol, cast
from urllib.parse import unquote

import re2
from jsonschema.exceptions import best_match
from jsonschema.protocols import Validator
from jsonschema.validators import (
    Draft3Validator,
    Draft4Validator,
    Draft6Validator,
    Draft7Validator,
    Draft201909Validator,
    Draft202012Validator,
    validator_for,
)

MAX_PATTERN_LENGTH = 4096
"""Characters in one pattern a tenant writes (the CRD's limit on `pattern`, too)."""
RE2_MAX_MEM = 2 << 20
"""Bytes RE2 may use for one compiled pattern (its program and its DFA cache). The google-re2
module keeps the last 128 compiled patterns, so they hold 256 MiB at the very most."""
MAX_SCHEMA_DEPTH = 64
"""Levels of nested objects and arrays in a JSON Schema."""

DIALECTS: tuple[type[Validator], ...] = (
    Draft3Validator, Draft4Validator, Draft6Validator, Draft7Validator, Draft201909Validator, Draft202012Validator)
REF_KEYWORDS = ("$ref", "$dynamicRef", "$recursiveRef")
DATA_KEYWORDS = frozenset({"const", "enum", "default", "examples"})
# Keywords whose value maps names (properties, definitions) to schemas: a key there is a name, so a
# property called `const` or `pattern` is a schema like any other.
NAMED_SCHEMAS = frozenset({"properties", "patternProperties", "$defs", "definitions", "dependentSchemas",
                           "dependencies"})


class PatternError(ValueError):
    """A pattern RE2 does not accept (or one too long)."""


class SchemaError(ValueError):
    """A JSON Schema that is not accepted: invalid, remote, or with a pattern RE2 does not accept."""


class CompiledRegex(Protocol):
    """What the scorers use of a compiled RE2 pattern."""

    def search(self, text: str) -> object | None: ...

    def fullmatch(self, text: str) -> object | None: ...


def _options() -> Any:
    options = re2.Options()
    options.max_mem = RE2_MAX_MEM
    options.log_errors = False  # a refused pattern is reported to the tenant, not to stderr
    return options


_OPTIONS = _options()
_HINTS = (("\\Z", "write \\z for the end of the text"),
          ("(?=", "RE2 has no lookaround"), ("(?!", "RE2 has no lookaround"),
          ("(?<=", "RE2 has no lookaround"), ("(?<!", "RE2 has no lookaround"),
          ("(?>", "RE2 has no atomic groups"))


def _describe(pattern: str) -> str:
    return repr(pattern) if len(pattern) <= 120 else f"{pattern[:117]!r}..."


def compile_regex(pattern: str, *, ignore_case: bool = False, multiline: bool = False, dotall: bool = False,
                  max_length: int | None = MAX_PATTERN_LENGTH) -> CompiledRegex:
    """`pattern` compiled by RE2 (the google-re2 module caches it). Raises PatternError, naming the
    pattern and RE2's reason. `max_length` None: no length limit (a pattern built from checked parts)."""
    if not isinstance(pattern, str):
        raise PatternError(f"a pattern is a string, not {type(pattern).__name__}")
    if max_length is not None and len(pattern) > max_length:
        raise PatternError(f"invalid pattern {_describe(pattern)}: {len(pattern)} characters, "
                           f"more than the {max_length} a pattern may have")
    flags = "".join(f for f, on in (("i", ignore_case), ("m", multiline), ("s", dotall)) if on)
    try:
        return cast(CompiledRegex, re2.compile(f"(?{flags}){pattern}" if flags else pattern, _OPTIONS))
    except re2.error as exc:
        reason = exc.args[0] if exc.args else exc
        if isinstance(reason, bytes):
            reason = reason.decode("utf-8", "replace")
        hints = {hint for token, hint in _HINTS if token in pattern}
        if any(f"escape sequence: \\{d}" in str(reason) for d in "123456789"):
            hints.add("RE2 has no backreferences")
        extra = f" ({'; '.join(sorted(hints))})" if hints else ""
        raise PatternError(f"invalid pattern {_describe(pattern)}: RE2 cannot compile it: {reason}{extra}") from None


def escape(text: str) -> str:
    """`text` as an RE2 pattern that matches exactly it."""
    return cast(str, re2.escape(text))


# --- JSON Schema ------------------------------------------------------------------------------------


def _dialect_id(cls: type[Validator]) -> str:
    meta = cls.META_SCHEMA
    return str(meta.get("$id", meta.get("id", ""))).rstrip("#")


_DIALECT_IDS = {_dialect_id(cls): cls for cls in DIALECTS}


def _path(parts: tuple[str | int, ...]) -> str:
    return "/".join(str(p) for p in parts) or "the root"


def _schema_nodes(schema: Any) -> Iterator[tuple[tuple[str | int, ...], Mapping[str, Any]]]:
    """Every object of the schema that is (or may be) a schema, with its path; depth-checked."""
    stack: list[tuple[tuple[str | int, ...], Any]] = [((), schema)]
    while stack:
        path, node = stack.pop()
        if len(path) > MAX_SCHEMA_DEPTH:
            raise SchemaError(f"nested more than {MAX_SCHEMA_DEPTH} levels deep (at {_path(path[:8])}/...)")
        if isinstance(node, list):
            stack.extend(((*path, i), item) for i, item in enumerate(node))
        elif isinstance(node, Mapping):
            yield path, node
            for key, value in node.items():
                if key in DATA_KEYWORDS:
                    continue
                if key in NAMED_SCHEMAS and isinstance(value, Mapping):
                    stack.extend(((*path, key, name), sub) for name, sub in value.items())
                else:
                    stack.append(((*path, key), value))


def _check_node(path: tuple[str | int, ...], node: Mapping[str, Any]) -> None:
    where = _path(path)
    for keyword in REF_KEYWORDS:
        ref = node.get(keyword)
        if isinstance(ref, str) and not ref.startswith("#"):
            raise SchemaError(f"{keyword} {_describe(ref)} at {where} is not local: only references within "
                              "the schema (#/$defs/..., #anchor) are allowed, nothing is fetched")
    dialect = node.get("$schema")
    if isinstance(dialect, str) and dialect.rstrip("#") not in _DIALECT_IDS:
        raise SchemaError(f"$schema {_describe(dialect)} at {where} is not a dialect this operator knows "
                          f"(one of {', '.join(sorted(_DIALECT_IDS))})")
    pattern = node.get("pattern")
    if isinstance(pattern, str):
        try:
            compile_regex(pattern)
        except PatternError as exc:
            raise SchemaError(f"pattern at {where}: {exc}") from None
    properties = node.get("patternProperties")
    if isinstance(properties, Mapping):
        for key in properties:
            try:
                compile_regex(str(key))
            except PatternError as exc:
                raise SchemaError(f"patternProperties at {where}: {exc}") from None


def _pointer_target(schema: Any, ref: str) -> tuple[bool, Any]:
    """(found, node) at the JSON pointer of a `#/...` reference."""
    node = schema
    for raw in ref[2:].split("/"):
        token = unquote(raw).replace("~1", "/").replace("~0", "~")
        if isinstance(node, Mapping) and token in node:
            node = node[token]
        elif isinstance(node, list) and token.isdigit() and int(token) < len(node):
            node = node[int(token)]
        else:
            return False, None
    return True, node


Nodes = list[tuple[tuple[str | int, ...], Mapping[str, Any]]]


def _check_pointers(schema: Mapping[str, Any], nodes: Nodes) -> None:
    """Every `#/...` reference leads somewhere, and what it leads to is checked as a schema even
    where the walk took it for data (`#/const` makes the value of `const` a schema). Done when no
    nested `$id` moves the base the references resolve against; with one, resolution is
    jsonschema's, and a reference that leads nowhere, or out, fails the scoring, never a fetch."""
    if any(path and isinstance(node.get("$id", node.get("id")), str) for path, node in nodes):
        return
    todo, seen = list(nodes), set()
    while todo:
        path, node = todo.pop()
        for keyword in REF_KEYWORDS:
            ref = node.get(keyword)
            if not (isinstance(ref, str) and ref.startswith("#/")) or ref in seen:
                continue
            seen.add(ref)
            found, target = _pointer_target(schema, ref)
            if not found:
                raise SchemaError(f"{keyword} {_describe(ref)} at {_path(path)} points nowhere in the schema")
            targets = list(_schema_nodes(target))
            for sub_path, sub in targets:
                _check_node((ref, *sub_path), sub)
            todo.extend(((ref, *sub_path), sub) for sub_path, sub in targets)


def check_schema(schema: object) -> type[Validator]:
    """Accept a tenant's JSON Schema (see the module's doc) and say which validator class is its
    dialect's; raise SchemaError, saying what and where, if it is not accepted."""
    if isinstance(schema, bool):
        return Draft202012Validator
    if not isinstance(schema, Mapping):
        raise SchemaError(f"a JSON Schema is an object (or true/false), not {type(schema).__name__}")
    nodes = list(_schema_nodes(schema))
    for path, node in nodes:
        _check_node(path, node)
    _check_pointers(schema, nodes)
    cls = validator_for(dict(schema))
    # The metaschema's own `format` checks are left out: `regex` would compile with Python's re, and
    # every pattern has been compiled by RE2 above.
    meta = validator_for(cls.META_SCHEMA, default=cls)(cls.META_SCHEMA, format_checker=None)
    try:
        error = best_match(meta.iter_errors(dict(schema)))
    except RecursionError:
        raise SchemaError(f"nested more than {MAX_SCHEMA_DEPTH} levels deep") from None
    if error is not None:
        where = _path(tuple(error.path))
        raise SchemaError(f"invalid JSON Schema at {where}: {error.message}")
    return cls


@functools.lru_cache(maxsize=256)
def _check_schema_text(text: str) -> type[Validator]:
    return check_schema(json.loads(text))


def check_schema_cached(schema: object) -> type[Validator]:
    """`check_schema`, remembered for the last 256 accepted schemas: a rollout is parsed at every
    reconcile, and its schemas need checking once."""
    try:
        text = json.dumps(schema, sort_keys=True)
    except (TypeError, ValueError) as exc:
        raise SchemaError(f"not JSON: {exc}") from None
    return _check_schema_text(text)
