"""Scorers: a model's answer and the case's expectation in, a score in [0, 1] out.

A scorer is built from a spec, `{"type": ..., **options}` (or the command line's
`type:key=value,key=value`), checked once when it is built, so that a bad spec fails before a single
request goes out:

- `exact_match`: the normalised answer equals the normalised expectation (a string, or a list of
  acceptable strings).
- `contains`: the normalised answer contains the expectation; with a list, `require` says whether
  `any` (default) or `all` must appear, or `fraction` scores the share that does.
- `regex`: `pattern` (where `{expected}` stands for the escaped, normalised expectation), or the
  expectation itself as the pattern; `mode` `search` (default) or `full`; `ignore_case`,
  `multiline`, `dotall`. Patterns are RE2's and run on RE2, in linear time (see
  `slmfleet.api.tenant_patterns`: no backreferences or lookaround, `\\d`/`\\w`/`\\b` are ASCII).
- `json_schema`: the answer parses as JSON and validates against `schema` (or, without it, against
  the case's expectation, which then is the schema), with the pinned `jsonschema`. The schema is
  checked when the scorer is built (`tenant_patterns.check_schema`: valid, local `$ref`s only, RE2
  patterns); validation never fetches anything, runs every `pattern` and `patternProperties` key on
  RE2, and gives up (ScorerError) after MAX_SCHEMA_STEPS keyword evaluations for one answer, so a
  schema whose references fan out exponentially cannot hold a scoring thread either.
- `json_field`: the answer parses as JSON and the value at `field` (`label`, `a.b[0]`,
  `items[2]["odd.key"]`) equals the expectation. When the expectation is itself an object or array
  (or JSON text of one) holding that path, the value there is expected; otherwise the expectation
  is the value. Strings compare after normalisation; a string and a number/boolean/null compare as
  text (`"4"` matches `4`); everything else compares as JSON (`true` is not `1`).

Normalisation (every text scorer): `normalize` is a list of names (`lowercase`, `strip`,
`collapse_whitespace`, `strip_punctuation`, `remove_articles`; camelCase is accepted) or a string of
them joined by `+`; without it only `strip` applies. Each name is also a boolean option that switches
that step on or off (`ignore_case` is `lowercase`). They run in the order lowercase (Unicode case
folding), strip punctuation (Unicode category P), remove English articles, collapse whitespace, strip.

The JSON scorers strip a Markdown code fence around the answer (```json ... ```) unless
`strip_code_fences` is false. Type names and option keys may be camelCase (`exactMatch`,
`stripPunctuation`), which is how the ModelRollout API spells them; `None` values count as absent.
"""

from __future__ import annotations

import functools
import importlib
import json
import re
import threading
import unicodedata
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, ClassVar

from jsonschema.protocols import Validator
from jsonschema.validators import extend
from referencing import Registry
from referencing.exceptions import Unresolvable

from slmfleet.api.tenant_patterns import (
    MAX_PATTERN_LENGTH,
    CompiledRegex,
    PatternError,
    SchemaError,
    check_schema,
    compile_regex,
    escape,
)


class ScorerError(ValueError):
    """A scorer spec, or a case's expectation, that a scorer cannot work with."""


# --- normalisation ----------------------------------------------------------------------------------

_NORMALIZATION_ALIASES = {"ignore_case": "lowercase", "case_insensitive": "lowercase", "casefold": "lowercase"}
_ARTICLES = re.compile(r"\b(?:a|an|the)\b\s*", re.IGNORECASE)
_WHITESPACE = re.compile(r"\s+")


@dataclass(frozen=True)
class Normalization:
    """Which normalisation steps apply (the default: strip only)."""

    lowercase: bool = False
    strip: bool = True
    collapse_whitespace: bool = False
    strip_punctuation: bool = False
    remove_articles: bool = False

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))

    def apply(self, text: str) -> str:
        if self.lowercase:
            text = text.casefold()
        if self.strip_punctuation:
            text = "".join(ch for ch in text if not unicodedata.category(ch).startswith("P"))
        if self.remove_articles:
            text = _ARTICLES.sub("", text)
        if self.collapse_whitespace:
            text = _WHITESPACE.sub(" ", text)
        if self.strip:
            text = text.strip()
        return text

    def enabled(self) -> list[str]:
        return [name for name in self.names() if getattr(self, name)]


def _normalization_name(raw: str, where: str) -> str:
    name = _snake(raw.strip())
    name = _NORMALIZATION_ALIASES.get(name, name)
    if name not in Normalization.names():
        raise ScorerError(f"{where}: unknown normalisation {raw!r} (known: {', '.join(Normalization.names())})")
    return name


# --- options ----------------------------------------------------------------------------------------


def _snake(key: str) -> str:
    """`stripPunctuation` -> `strip_punctuation`; `exact-match` -> `exact_match`."""
    return re.sub(r"(?<=[a-z0-9])([A-Z])", r"_\1", key).replace("-", "_").lower()


class _Options:
    """Typed reads of a spec's options; whatever is left at the end is an unknown option."""

    def __init__(self, scorer_type: str, raw: Mapping[str, Any]) -> None:
        self.type = scorer_type
        self.raw = dict(raw)
        self.used: dict[str, Any] = {}

    def _fail(self, key: str, what: str) -> ScorerError:
        return ScorerError(f"scorer {self.type}: option {key!r} {what}")

    def take(self, key: str) -> Any:
        return self.raw.pop(key, None)

    def bool(self, key: str, default: bool) -> bool:
        value = self.take(key)
        if value is None:
            return default
        if isinstance(value, str) and value.strip().lower() in ("true", "yes", "on", "1", "false", "no", "off", "0"):
            value = value.strip().lower() in ("true", "yes", "on", "1")
        if not isinstance(value, bool):
            raise self._fail(key, f"must be true or false, not {value!r}")
        self.used[key] = value
        return value

    def text(self, key: str, default: str | None = None) -> str | None:
        value = self.take(key)
        if value is None:
            return default
        if not isinstance(value, str):
            raise self._fail(key, f"must be a string, not {value!r}")
        self.used[key] = value
        return value

    def choice(self, key: str, choices: Sequence[str], default: str) -> str:
        value = self.text(key, default)
        assert value is not None
        if value not in choices:
            raise self._fail(key, f"must be one of {', '.join(choices)}, not {value!r}")
        return value

    def normalization(self) -> Normalization:
        where = f"scorer {self.type}"
        listed = self.take("normalize")
        if listed is None:
            steps = {"strip"}
        elif isinstance(listed, str):
            steps = {_normalization_name(n, where) for n in re.split(r"[+|,\s]+", listed) if n}
        elif isinstance(listed, (list, tuple)) and all(isinstance(n, str) for n in listed):
            steps = {_normalization_name(n, where) for n in listed}
        else:
            raise self._fail("normalize", f"must be a list of names, not {listed!r}")
        for key in list(self.raw):
            name = _NORMALIZATION_ALIASES.get(key, key)
            if name in Normalization.names():
                if self.bool(key, False):
                    steps.add(name)
                else:
                    steps.discard(name)
                self.used.pop(key, None)
        norm = Normalization(**{name: name in steps for name in Normalization.names()})
        self.used["normalize"] = norm.enabled()
        return norm

    def finish(self, allowed: Iterable[str]) -> None:
        if self.raw:
            unknown = ", ".join(repr(k) for k in sorted(self.raw))
            raise ScorerError(f"scorer {self.type}: unknown option {unknown} "
                              f"(allowed: {', '.join(sorted(set(allowed)))})")


# --- the scorers ------------------------------------------------------------------------------------

_NORMALIZATION_OPTIONS = ("normalize", *Normalization.names(), *_NORMALIZATION_ALIASES)


class Scorer:
    """Base class. Subclasses set `type` and `OPTIONS`, read their options in `configure`, check an
    expectation in `check` (raising ScorerError) and score in `score`."""

    type: ClassVar[str] = ""
    OPTIONS: ClassVar[tuple[str, ...]] = ()

    def __init__(self, name: str, options: Mapping[str, Any]) -> None:
        self.name = name
        opts = _Options(self.type, options)
        self.configure(opts)
        opts.finish(self.OPTIONS)
        self.options: dict[str, Any] = opts.used

    def configure(self, opts: _Options) -> None:  # pragma: no cover - every scorer overrides it
        raise NotImplementedError

    def check(self, expected: Any) -> None:
        """Raise ScorerError if this scorer cannot score against `expected`."""

    def score(self, response: str, expected: Any) -> float:  # pragma: no cover
        raise NotImplementedError

    @property
    def spec(self) -> dict[str, Any]:
        """The spec this scorer stands for, with its effective options."""
        return {"type": self.type, "name": self.name, **self.options}

    def _key(self) -> str:
        return json.dumps(self.spec, sort_keys=True, default=str)

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Scorer) and self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.spec!r})"


SCORERS: dict[str, type[Scorer]] = {}


def register_scorer(cls: type[Scorer]) -> type[Scorer]:
    """Class decorator: make a scorer type buildable by name."""
    if not cls.type:
        raise ValueError(f"{cls.__name__} has no type name")
    SCORERS[cls.type] = cls
    return cls


def _expected_texts(scorer: str, expected: Any) -> list[str]:
    """A string, a number/boolean (as JSON text) or a non-empty list of them."""
    items = expected if isinstance(expected, list) else [expected]
    if not items:
        raise ScorerError(f"{scorer}: the expectation is an empty list")
    out = []
    for item in items:
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, (bool, int, float)):
            out.append(json.dumps(item))
        elif item is None:
            raise ScorerError(f"{scorer} needs an expected answer")
        else:
            raise ScorerError(f"{scorer} compares text: the expectation must be a string or a list of strings, "
                              f"not {json.dumps(item)[:80]}")
    return out


@register_scorer
class ExactMatch(Scorer):
    type = "exact_match"
    OPTIONS = _NORMALIZATION_OPTIONS

    def configure(self, opts: _Options) -> None:
        self.norm = opts.normalization()

    def check(self, expected: Any) -> None:
        _expected_texts(self.type, expected)

    def score(self, response: str, expected: Any) -> float:
        answer = self.norm.apply(response)
        return 1.0 if any(answer == self.norm.apply(e) for e in _expected_texts(self.type, expected)) else 0.0


@register_scorer
class Contains(Scorer):
    type = "contains"
    OPTIONS = (*_NORMALIZATION_OPTIONS, "require")

    def configure(self, opts: _Options) -> None:
        self.norm = opts.normalization()
        self.require = opts.choice("require", ("any", "all", "fraction"), "any")

    def check(self, expected: Any) -> None:
        for text in _expected_texts(self.type, expected):
            if not self.norm.apply(text):
                raise ScorerError(f"{self.type}: the expectation {text!r} is empty after normalisation "
                                  "and would match any answer")

    def score(self, response: str, expected: Any) -> float:
        answer = self.norm.apply(response)
        found = [self.norm.apply(e) in answer for e in _expected_texts(self.type, expected)]
        if self.require == "all":
            return 1.0 if all(found) else 0.0
        if self.require == "fraction":
            return sum(found) / len(found)
        return 1.0 if any(found) else 0.0


@register_scorer
class Regex(Scorer):
    type = "regex"
    OPTIONS = (*_NORMALIZATION_OPTIONS, "pattern", "mode", "ignore_case", "multiline", "dotall")

    def configure(self, opts: _Options) -> None:
        # `ignore_case` is a regex flag here, not the lowercase normalisation.
        self.flags = {key: opts.bool(key, False) for key in ("ignore_case", "multiline", "dotall")}
        self.norm = opts.normalization()
        self.mode = opts.choice("mode", ("search", "full"), "search")
        self.pattern = opts.text("pattern")
        if self.pattern is not None:
            # Fails now on a bad pattern; `{expected}` becomes an escaped literal, any literal stands for it.
            self._compiled(self.pattern.replace("{expected}", "x"))

    def _compiled(self, pattern: str, max_length: int | None = MAX_PATTERN_LENGTH) -> CompiledRegex:
        try:
            return compile_regex(pattern, max_length=max_length, **self.flags)
        except PatternError as exc:
            raise ScorerError(f"{self.type}: {exc}") from None

    def _patterns(self, expected: Any) -> list[tuple[str, int | None]]:
        """The patterns to try, each with the length limit it has: the tenant wrote the pattern (or
        the expectation that is one); an expectation put into `{expected}` is an escaped literal."""
        if self.pattern is None:
            return [(p, MAX_PATTERN_LENGTH) for p in _expected_texts(self.type, expected)]
        if "{expected}" not in self.pattern:
            return [(self.pattern, MAX_PATTERN_LENGTH)]
        return [(self.pattern.replace("{expected}", escape(self.norm.apply(e))), None)
                for e in _expected_texts(self.type, expected)]

    def check(self, expected: Any) -> None:
        for pattern, limit in self._patterns(expected):
            self._compiled(pattern, limit)

    def score(self, response: str, expected: Any) -> float:
        answer = self.norm.apply(response)
        for pattern, limit in self._patterns(expected):
            compiled = self._compiled(pattern, limit)
            if (compiled.fullmatch(answer) if self.mode == "full" else compiled.search(answer)):
                return 1.0
        return 0.0


_FENCE = re.compile(r"^```[^\n`]*\n(.*?)\n?```$", re.DOTALL)
_NO_JSON = object()


def parse_json_answer(response: str, strip_code_fences: bool = True) -> Any:
    """The JSON value of an answer, or `_NO_JSON` when it is not JSON."""
    text = response.strip()
    if strip_code_fences:
        m = _FENCE.match(text)
        if m:
            text = m.group(1).strip()
    try:
        return json.loads(text)
    except (ValueError, RecursionError):
        return _NO_JSON


def _json_or_text(value: Any) -> Any:
    """An expectation given as JSON text becomes its value; other strings stay strings."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


# --- JSON Schema validation: RE2, no fetching, a budget ----------------------------------------------


class _RE2Search:
    """Stands in for the `re` module inside jsonschema's keyword modules, whose one use of it is
    `re.search(pattern, text)` on the schema's `pattern` and `patternProperties` keys (for
    `pattern`, `patternProperties`, `additionalProperties` and `unevaluatedProperties`): jsonschema
    has no setting for its regex engine, so this gives it RE2. The patterns were accepted by RE2
    when the schema was checked; `additionalProperties` joins them with `|`, hence no length limit."""

    def search(self, pattern: str, string: str, flags: int = 0) -> object | None:
        if flags:  # pragma: no cover - jsonschema passes none
            raise PatternError("RE2 in jsonschema takes no flags")
        return compile_regex(pattern, max_length=None).search(string)

    def __getattr__(self, name: str) -> Any:
        return getattr(re, name)


JSONSCHEMA_REGEX_MODULES = ("jsonschema._keywords", "jsonschema._utils", "jsonschema._legacy_keywords")


def use_re2_in_jsonschema() -> None:
    """Make jsonschema match schema patterns with RE2 in this process (idempotent)."""
    for name in JSONSCHEMA_REGEX_MODULES:
        module = importlib.import_module(name)
        if not isinstance(getattr(module, "re", None), _RE2Search):
            setattr(module, "re", _RE2Search())  # noqa: B010 - mypy does not know the module has `re`


use_re2_in_jsonschema()

MAX_SCHEMA_STEPS = 100_000
"""Keyword evaluations one answer may take against a schema (a 1000-item array of small objects takes
7,000, a few milliseconds; 100,000 through references take about 4 s of one scoring thread); past it the
scorer gives up with a ScorerError, which ends the evaluation as an error."""


class _Budget(threading.local):
    steps = 0


_BUDGET = _Budget()


class _OverBudget(Exception):
    pass


_Keyword = Callable[[Any, Any, Any, Any], Iterator[Any]]


def _counted(keyword: _Keyword) -> _Keyword:
    def counted(validator: Any, value: Any, instance: Any, schema: Any) -> Iterator[Any]:
        _BUDGET.steps += 1
        if _BUDGET.steps > MAX_SCHEMA_STEPS:
            raise _OverBudget
        yield from keyword(validator, value, instance, schema)
    return counted


@functools.cache
def _budgeted(cls: type[Validator]) -> type[Validator]:
    """`cls` with every keyword counted against the budget of the answer being scored."""
    extended: type[Validator] = extend(  # type: ignore[no-untyped-call]  # the stub leaves it untyped
        cls, validators={name: _counted(fn) for name, fn in cls.VALIDATORS.items()})
    return extended


_LOCAL_ONLY: Registry[Any] = Registry()  # retrieves nothing: a reference it does not hold is Unresolvable


@functools.lru_cache(maxsize=256)
def _validator(schema_json: str, check_formats: bool) -> Validator:
    schema = json.loads(schema_json)
    try:
        cls = check_schema(schema)
    except SchemaError as exc:
        raise ScorerError(f"json_schema: {exc}") from None
    budgeted = _budgeted(cls)
    return budgeted(schema, format_checker=cls.FORMAT_CHECKER if check_formats else None, registry=_LOCAL_ONLY)


def _is_valid(validator: Validator, doc: Any) -> bool:
    _BUDGET.steps = 0
    try:
        return validator.is_valid(doc)
    except _OverBudget:
        raise ScorerError(f"json_schema: validating one answer took more than {MAX_SCHEMA_STEPS} steps; "
                          "simplify the schema (references that fan out)") from None
    except Unresolvable as exc:
        raise ScorerError(f"json_schema: the schema has a reference that cannot be resolved: {exc}") from None
    except RecursionError:
        raise ScorerError("json_schema: the schema's references loop without end") from None
    except PatternError as exc:
        raise ScorerError(f"json_schema: {exc}") from None


@register_scorer
class JsonSchema(Scorer):
    type = "json_schema"
    # Normalisation is accepted (the API gives every scorer a default) and means nothing here.
    OPTIONS = (*_NORMALIZATION_OPTIONS, "schema", "strip_code_fences", "check_formats")

    def configure(self, opts: _Options) -> None:
        opts.normalization()
        opts.used.pop("normalize", None)
        self.fences = opts.bool("strip_code_fences", True)
        self.check_formats = opts.bool("check_formats", False)
        schema = opts.take("schema")
        self.schema_json: str | None = None
        if schema is not None:
            self.schema_json = self._schema_json(_json_or_text(schema), "option 'schema'")
            _validator(self.schema_json, self.check_formats)
            opts.used["schema"] = json.loads(self.schema_json)

    def _schema_json(self, schema: Any, where: str) -> str:
        if not isinstance(schema, (dict, bool)):
            raise ScorerError(f"{self.type}: {where} must be a JSON Schema (an object), not {json.dumps(schema)[:80]}")
        return json.dumps(schema, sort_keys=True)

    def _validator_for(self, expected: Any) -> Validator:
        if self.schema_json is not None:
            return _validator(self.schema_json, self.check_formats)
        if expected is None:
            raise ScorerError(f"{self.type} needs a schema: the option 'schema' or the case's expectation")
        return _validator(self._schema_json(_json_or_text(expected), "the expectation"), self.check_formats)

    def check(self, expected: Any) -> None:
        self._validator_for(expected)

    def score(self, response: str, expected: Any) -> float:
        doc = parse_json_answer(response, self.fences)
        if doc is _NO_JSON:
            return 0.0
        return 1.0 if _is_valid(self._validator_for(expected), doc) else 0.0


_PATH_TOKEN = re.compile(r"""\.?([^.\[\]"']+)|\[(\d+)\]|\[\s*"((?:[^"\\]|\\.)*)"\s*\]|\[\s*'([^']*)'\s*\]""")


def parse_field_path(path: str) -> tuple[str | int, ...]:
    """`a.b[0]` -> ('a', 'b', 0); `["x.y"].z` -> ('x.y', 'z'). Raises ScorerError."""
    if not isinstance(path, str) or not path.strip():
        raise ScorerError("json_field: option 'field' must be a path such as label or a.b[0]")
    out: list[str | int] = []
    pos = 0
    text = path.strip()
    while pos < len(text):
        m = _PATH_TOKEN.match(text, pos)
        if not m or (m.group(1) is not None and text[pos] == "." and pos == 0):
            raise ScorerError(f"json_field: cannot parse the field path {path!r} at position {pos + 1}")
        name, index, dq, sq = m.groups()
        if name is not None:
            out.append(name.strip())
        elif index is not None:
            out.append(int(index))
        elif dq is not None:
            out.append(json.loads(f'"{dq}"'))
        else:
            out.append(sq)
        pos = m.end()
    return tuple(out)


def resolve_field(doc: Any, path: Sequence[str | int]) -> tuple[bool, Any]:
    """(found, value) at `path` in a JSON value."""
    for step in path:
        if isinstance(step, int):
            if not isinstance(doc, list) or step >= len(doc):
                return False, None
            doc = doc[step]
        else:
            if not isinstance(doc, dict) or step not in doc:
                return False, None
            doc = doc[step]
    return True, doc


@register_scorer
class JsonField(Scorer):
    type = "json_field"
    OPTIONS = (*_NORMALIZATION_OPTIONS, "field", "strip_code_fences")

    def configure(self, opts: _Options) -> None:
        self.norm = opts.normalization()
        self.fences = opts.bool("strip_code_fences", True)
        field = opts.text("field")
        if field is None:
            raise ScorerError("scorer json_field needs the option 'field' (a path such as label or a.b[0])")
        self.path = parse_field_path(field)

    def expected_value(self, expected: Any) -> Any:
        value = _json_or_text(expected)
        if isinstance(value, (dict, list)):
            found, inner = resolve_field(value, self.path)
            if found:
                return inner
        return value

    def check(self, expected: Any) -> None:
        if expected is None:
            raise ScorerError(f"{self.type} needs an expected value")

    def score(self, response: str, expected: Any) -> float:
        doc = parse_json_answer(response, self.fences)
        if doc is _NO_JSON:
            return 0.0
        found, actual = resolve_field(doc, self.path)
        if not found:
            return 0.0
        return 1.0 if self._equal(actual, self.expected_value(expected)) else 0.0

    def _equal(self, a: Any, b: Any) -> bool:
        if isinstance(a, str) and isinstance(b, str):
            return self.norm.apply(a) == self.norm.apply(b)
        scalar = (bool, int, float, type(None))
        if isinstance(a, str) and isinstance(b, scalar):
            return self.norm.apply(a) == self.norm.apply(json.dumps(b))
        if isinstance(b, str) and isinstance(a, scalar):
            return self._equal(b, a)
        if isinstance(a, bool) or isinstance(b, bool):
            return isinstance(a, bool) and isinstance(b, bool) and a == b
        if isinstance(a, dict) and isinstance(b, dict):
            return a.keys() == b.keys() and all(self._equal(a[k], b[k]) for k in a)
        if isinstance(a, list) and isinstance(b, list):
            return len(a) == len(b) and all(self._equal(x, y) for x, y in zip(a, b, strict=True))
        if isinstance(a, (int, float)) and isinstance(b, (int, float)):
            return a == b
        return a is None and b is None


# --- building ---------------------------------------------------------------------------------------


def scorer_type(name: str) -> str:
    """The registered type for a name as written (`exactMatch`, `exact-match`, `exact_match`)."""
    key = _snake(name.strip()) if isinstance(name, str) else name
    if key not in SCORERS:
        raise ScorerError(f"unknown scorer type {name!r} (known: {', '.join(sorted(SCORERS))})")
    return key


def build_scorer(spec: str | Mapping[str, Any] | Scorer) -> Scorer:
    """A scorer from `{"type": ..., "name"?: ..., **options}`, a `type:key=value,...` string, or a
    scorer (returned as is). Raises ScorerError (a ValueError) on a bad spec."""
    if isinstance(spec, Scorer):
        return spec
    if isinstance(spec, str):
        spec = parse_scorer_string(spec)
    if hasattr(spec, "model_dump"):  # a pydantic model of the API
        spec = spec.model_dump(by_alias=True, exclude_none=True)
    if not isinstance(spec, Mapping):
        raise ScorerError(f"a scorer spec is an object with a type, not {spec!r}")
    options = {_snake(str(k)): v for k, v in spec.items() if v is not None}
    raw_type = options.pop("type", None)
    if not isinstance(raw_type, str) or not raw_type.strip():
        raise ScorerError(f"a scorer spec needs a type (one of {', '.join(sorted(SCORERS))}): {dict(spec)!r}")
    kind = scorer_type(raw_type)
    name = options.pop("name", kind)
    if not isinstance(name, str) or not name.strip():
        raise ScorerError(f"scorer {kind}: name must be a non-empty string")
    return SCORERS[kind](name.strip(), options)


def build_scorers(specs: Iterable[str | Mapping[str, Any] | Scorer]) -> tuple[Scorer, ...]:
    """Scorers with unique names: a repeated name gets `_2`, `_3`, ... in order."""
    built = [build_scorer(s) for s in specs]
    if not built:
        raise ScorerError("at least one scorer is needed")
    seen: dict[str, int] = {}
    out = []
    for scorer in built:
        count = seen.get(scorer.name, 0) + 1
        seen[scorer.name] = count
        if count > 1:
            scorer = SCORERS[scorer.type](f"{scorer.name}_{count}",
                                          {k: v for k, v in scorer.options.items()})
        out.append(scorer)
    return tuple(out)


_SPLIT = re.compile(r",(?=\s*[A-Za-z_][A-Za-z0-9_]*\s*=)")


def _option_value(raw: str, where: str) -> Any:
    value = raw.strip()
    if value.startswith("@"):
        path = Path(value[1:])
        try:
            return json.loads(path.read_text())
        except OSError as exc:
            raise ScorerError(f"{where}: cannot read {path}: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise ScorerError(f"{where}: {path} is not JSON: {exc}") from None
    if value.lower() in ("true", "false"):
        return value.lower() == "true"
    if value[:1] in ("[", "{", '"'):
        try:
            return json.loads(value)
        except ValueError:
            return value
    return value


def parse_scorer_string(text: str) -> dict[str, Any]:
    """`exact_match`, `exact_match:lowercase=true,strip_punctuation=true`, `regex:pattern=^\\d{1,3}$`,
    `json_schema:schema=@schema.json`, or a JSON object. Values: true/false, JSON arrays, objects and
    quoted strings, `@file` (JSON read from a file), and anything else as a plain string. A comma
    separates options only when `name=` follows it, so patterns may hold commas."""
    text = text.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except ValueError as exc:
            raise ScorerError(f"scorer {text!r} is not valid JSON: {exc}") from None
        if not isinstance(parsed, dict):
            raise ScorerError(f"scorer {text!r} must be a JSON object")
        return parsed
    kind, _, rest = text.partition(":")
    if not kind.strip():
        raise ScorerError(f"scorer {text!r} has no type")
    spec: dict[str, Any] = {"type": kind.strip()}
    if rest.strip():
        for part in _SPLIT.split(rest):
            key, sep, value = part.partition("=")
            if not sep or not key.strip():
                raise ScorerError(f"scorer {text!r}: option {part!r} is not key=value")
            spec[key.strip()] = _option_value(value, f"scorer {kind.strip()}")
    return spec


def check_expected(scorers: Sequence[Scorer], expected: Any) -> list[str]:
    """Problems the scorers have with one expectation (empty when all can score it)."""
    problems = []
    for scorer in scorers:
        try:
            scorer.check(expected)
        except ScorerError as exc:
            problems.append(f"{scorer.name}: {exc}")
    return problems


def score_all(scorers: Sequence[Scorer], response: str, expected: Any) -> dict[str, float]:
    """Every scorer's score for one answer, by scorer name."""
    return {s.name: float(s.score(response, expected)) for s in scorers}

