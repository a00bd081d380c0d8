"""Scorers: every option, the API's camelCase shape, the command-line form, and bad specs."""

import json

import pytest

from slmfleet.evaluation.scorers import (
    SCORERS,
    Normalization,
    Scorer,
    ScorerError,
    build_scorer,
    build_scorers,
    parse_field_path,
    parse_scorer_string,
    register_scorer,
)


def score(spec, response, expected=None):
    scorer = build_scorer(spec)
    scorer.check(expected)
    return scorer.score(response, expected)


# --- normalisation and exact_match ---------------------------------------------------------------

def test_normalization_steps_in_order():
    full = Normalization(lowercase=True, strip=True, collapse_whitespace=True, strip_punctuation=True,
                         remove_articles=True)
    assert full.apply("  The  Answer:\tIS, an   Apple!  ") == "answer is apple"
    assert Normalization().apply("  A b  ") == "A b"  # default: strip only
    assert Normalization(strip=False).apply(" x ") == " x "
    assert Normalization(lowercase=True).apply("STRASSE Straße") == "strasse strasse"  # case folding
    assert Normalization(strip_punctuation=True).apply("«don't» — ok.") == "dont  ok"
    assert Normalization(remove_articles=True).apply("the cat ate a banana, theme") == "cat ate banana, theme"


@pytest.mark.parametrize("spec, response, expected, want", [
    ("exact_match", "4", "4", 1.0),
    ("exact_match", " 4\n", "4", 1.0),  # strip is the default
    ("exact_match", "Paris", "paris", 0.0),
    ({"type": "exact_match", "lowercase": True}, "Paris", "paris", 1.0),
    ({"type": "exact_match", "ignore_case": True}, "PARIS", "paris", 1.0),
    ({"type": "exact_match", "strip": False}, " 4", "4", 0.0),
    ({"type": "exact_match", "collapse_whitespace": True}, "New   York", "New York", 1.0),
    ({"type": "exact_match"}, "New   York", "New York", 0.0),
    ({"type": "exact_match", "strip_punctuation": True}, "Paris.", "Paris", 1.0),
    ({"type": "exact_match", "remove_articles": True}, "The Eiffel Tower", "Eiffel Tower", 1.0),
    ({"type": "exact_match", "normalize": ["lowercase", "strip_punctuation", "remove_articles", "collapse_whitespace"]},
     "  The  Eiffel tower! ", "eiffel Tower", 0.0),  # an explicit list replaces the default: no strip
    ({"type": "exact_match", "normalize": "lowercase+strip+strip_punctuation+remove_articles+collapse_whitespace"},
     "  The  Eiffel tower! ", "eiffel Tower", 1.0),
    ({"type": "exact_match", "normalize": []}, " 4", "4", 0.0),
    ("exact_match", "blue", ["red", "blue"], 1.0),  # a list: any of them
    ("exact_match", "green", ["red", "blue"], 0.0),
    ("exact_match", "4", 4, 1.0),  # numbers compare as their JSON text
    ("exact_match", "true", True, 1.0),
])
def test_exact_match(spec, response, expected, want):
    assert score(spec, response, expected) == want


def test_the_api_shape_is_accepted():
    """The ModelRollout API dumps camelCase types and keys, a normalize list, and None for unset fields."""
    spec = {"type": "exactMatch", "normalize": ["lowercase", "stripPunctuation", "collapseWhitespace", "strip"],
            "pattern": None, "field": None, "schema": None}
    scorer = build_scorer(spec)
    assert scorer.type == "exact_match" and scorer.name == "exact_match"
    assert scorer.score("  Hello,   WORLD ", "hello world") == 1.0
    assert build_scorer({"type": "jsonField", "field": "label", "normalize": ["strip"]}).type == "json_field"
    assert build_scorer({"type": "exactMatch", "stripPunctuation": True}).score("ok!", "ok") == 1.0


# --- contains ----------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, response, expected, want", [
    ("contains", "The answer is 42.", "42", 1.0),
    ("contains", "The answer is 42.", "43", 0.0),
    ("contains", "PARIS is nice", "Paris", 0.0),
    ({"type": "contains", "lowercase": True}, "PARIS is nice", "Paris", 1.0),
    ("contains", "red and blue", ["green", "blue"], 1.0),
    ({"type": "contains", "require": "all"}, "red and blue", ["red", "blue"], 1.0),
    ({"type": "contains", "require": "all"}, "red and blue", ["red", "green"], 0.0),
    ({"type": "contains", "require": "fraction"}, "red and blue", ["red", "green", "blue", "pink"], 0.5),
])
def test_contains(spec, response, expected, want):
    assert score(spec, response, expected) == want


def test_contains_refuses_an_expectation_that_matches_everything():
    scorer = build_scorer({"type": "contains", "strip_punctuation": True})
    with pytest.raises(ScorerError, match="empty after normalisation"):
        scorer.check("...")


# --- regex -------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec, response, expected, want", [
    ({"type": "regex", "pattern": r"\d+"}, "it is 42 now", None, 1.0),  # search by default
    ({"type": "regex", "pattern": r"\d+", "mode": "full"}, "it is 42 now", None, 0.0),
    ({"type": "regex", "pattern": r"\d+", "mode": "full"}, " 42\n", None, 1.0),  # stripped first
    ({"type": "regex", "pattern": r"yes", "ignore_case": True}, "YES", None, 1.0),
    ({"type": "regex", "pattern": r"yes"}, "YES", None, 0.0),
    ({"type": "regex", "pattern": r"^b$", "multiline": True}, "a\nb\nc", None, 1.0),
    ({"type": "regex", "pattern": r"a.c", "dotall": True}, "a\nc", None, 1.0),
    ({"type": "regex", "pattern": r"a.c"}, "a\nc", None, 0.0),
    ({"type": "regex"}, "order 66 executed", r"order \d+", 1.0),  # the expectation is the pattern
    ({"type": "regex", "pattern": r"^answer: {expected}$"}, "answer: 3.14", "3.14", 1.0),  # escaped
    ({"type": "regex", "pattern": r"^answer: {expected}$"}, "answer: 3x14", "3.14", 0.0),
    ({"type": "regex", "pattern": r"^answer: {expected}$", "lowercase": True}, "ANSWER: Pi", "PI", 1.0),
    ({"type": "regex", "pattern": r"\b{expected}\b"}, "it is blue", ["red", "blue"], 1.0),
])
def test_regex(spec, response, expected, want):
    assert score(spec, response, expected) == want


def test_regex_bad_patterns():
    with pytest.raises(ScorerError, match="invalid pattern"):
        build_scorer({"type": "regex", "pattern": "(unclosed"})
    scorer = build_scorer("regex")
    with pytest.raises(ScorerError, match="invalid pattern"):
        scorer.check("[a-")
    with pytest.raises(ScorerError, match="needs an expected answer"):
        scorer.check(None)
    with pytest.raises(ScorerError, match="mode"):
        build_scorer({"type": "regex", "pattern": "x", "mode": "partial"})


# --- json_schema -------------------------------------------------------------------------------------

SCHEMA = {"type": "object", "required": ["label"], "additionalProperties": False,
          "properties": {"label": {"enum": ["positive", "negative"]}, "score": {"type": "number"}}}


@pytest.mark.parametrize("response, want", [
    ('{"label": "positive"}', 1.0),
    ('{"label": "positive", "score": 0.9}', 1.0),
    ('  {"label": "negative"}\n', 1.0),
    ('```json\n{"label": "negative"}\n```', 1.0),  # a Markdown fence is stripped
    ('{"label": "neutral"}', 0.0),
    ('{"label": "positive", "extra": 1}', 0.0),
    ('{"score": 1}', 0.0),
    ('label: positive', 0.0),
    ('Sure! {"label": "positive"}', 0.0),
    ('', 0.0),
])
def test_json_schema(response, want):
    assert score({"type": "json_schema", "schema": SCHEMA}, response) == want


def test_json_schema_options_and_sources():
    no_fences = {"type": "json_schema", "schema": SCHEMA, "strip_code_fences": False}
    assert score(no_fences, '```json\n{"label": "negative"}\n```') == 0.0
    # The schema as JSON text (how a CLI or an API string carries it).
    assert score({"type": "json_schema", "schema": json.dumps(SCHEMA)}, '{"label": "positive"}') == 1.0
    # Without the option, the case's expectation is the schema (an object or its JSON text).
    assert score("json_schema", '{"label": "positive"}', SCHEMA) == 1.0
    assert score("json_schema", '[1]', '{"type": "array"}') == 1.0
    email = {"type": "string", "format": "email"}
    assert score({"type": "json_schema", "schema": email}, '"not an email"') == 1.0
    assert score({"type": "json_schema", "schema": email, "check_formats": True}, '"not an email"') == 0.0
    assert score({"type": "json_schema", "schema": email, "check_formats": True}, '"a@example.com"') == 1.0


def test_json_schema_bad_schemas():
    with pytest.raises(ScorerError, match="invalid JSON Schema at properties/x"):
        build_scorer({"type": "json_schema", "schema": {"properties": {"x": {"type": "nope"}}}})
    with pytest.raises(ScorerError, match="must be a JSON Schema"):
        build_scorer({"type": "json_schema", "schema": [1, 2]})
    scorer = build_scorer("json_schema")
    with pytest.raises(ScorerError, match="needs a schema"):
        scorer.check(None)
    with pytest.raises(ScorerError, match="must be a JSON Schema"):
        scorer.check("positive")


# --- json_field --------------------------------------------------------------------------------------

def test_field_paths():
    assert parse_field_path("label") == ("label",)
    assert parse_field_path("a.b[0]") == ("a", "b", 0)
    assert parse_field_path("entities[0].type") == ("entities", 0, "type")
    assert parse_field_path('a["x.y"][2]') == ("a", "x.y", 2)
    assert parse_field_path("[1][0]") == (1, 0)
    for bad in ("", ".a", "a..b", "a[x]", "a[0", "a.[0]"):
        with pytest.raises(ScorerError, match="field"):
            parse_field_path(bad)


@pytest.mark.parametrize("spec, response, expected, want", [
    ({"field": "label"}, '{"label": "positive"}', "positive", 1.0),
    ({"field": "label"}, '{"label": "Positive "}', "positive", 0.0),
    ({"field": "label", "lowercase": True}, '{"label": "Positive "}', "positive", 1.0),
    ({"field": "label"}, '{"label": "negative"}', "positive", 0.0),
    ({"field": "label"}, '{"other": "positive"}', "positive", 0.0),
    ({"field": "label"}, 'positive', "positive", 0.0),  # not JSON
    ({"field": "a.b[1]"}, '{"a": {"b": [0, 7]}}', 7, 1.0),
    ({"field": "a.b[1]"}, '{"a": {"b": [0]}}', 7, 0.0),  # index out of range
    ({"field": "a.b[1]"}, '{"a": {"b": [0, 7]}}', "7", 1.0),  # JSON text expectation
    ({"field": "count"}, '{"count": "7"}', 7, 1.0),  # a string and a number compare as text
    ({"field": "count"}, '{"count": 7.0}', 7, 1.0),
    ({"field": "flag"}, '{"flag": 1}', True, 0.0),  # true is not 1
    ({"field": "flag"}, '{"flag": true}', "true", 1.0),
    ({"field": "label"}, '{"label": "positive"}', {"label": "positive", "why": "x"}, 1.0),  # same path in it
    ({"field": "label"}, '{"label": "positive"}', '{"label": "positive"}', 1.0),
    ({"field": "tags"}, '{"tags": ["A", "b"]}', ["a", "b"], 0.0),
    ({"field": "tags", "lowercase": True}, '{"tags": ["A", "b"]}', ["a", "b"], 1.0),
    ({"field": "tags"}, '{"tags": ["a"]}', ["a", "b"], 0.0),
    ({"field": "who"}, '{"who": {"name": "Ada", "age": 36}}', {"name": "Ada", "age": 36}, 1.0),
    ({"field": "label"}, '```\n{"label": "positive"}\n```', "positive", 1.0),
    ({"field": "label", "strip_code_fences": False}, '```\n{"label": "positive"}\n```', "positive", 0.0),
])
def test_json_field(spec, response, expected, want):
    assert score({"type": "json_field", **spec}, response, expected) == want


def test_json_field_needs_a_field_and_an_expectation():
    with pytest.raises(ScorerError, match="needs the option 'field'"):
        build_scorer("json_field")
    with pytest.raises(ScorerError, match="needs an expected value"):
        build_scorer("json_field:field=label").check(None)


# --- specs -------------------------------------------------------------------------------------------

def test_command_line_form():
    assert parse_scorer_string("exact_match") == {"type": "exact_match"}
    assert parse_scorer_string("exact_match:lowercase=true,strip=false") == {
        "type": "exact_match", "lowercase": True, "strip": False}
    # A comma belongs to the value unless `name=` follows it, so patterns may hold commas.
    assert parse_scorer_string(r"regex:pattern=^\d{1,3}$,mode=full") == {
        "type": "regex", "pattern": r"^\d{1,3}$", "mode": "full"}
    assert parse_scorer_string('contains:require=all') == {"type": "contains", "require": "all"}
    assert parse_scorer_string('exact_match:normalize=["lowercase","strip"]')["normalize"] == ["lowercase", "strip"]
    assert parse_scorer_string('{"type": "regex", "pattern": "a,b=c"}') == {"type": "regex", "pattern": "a,b=c"}
    assert parse_scorer_string("json_field:field=a.b[0]") == {"type": "json_field", "field": "a.b[0]"}


def test_schema_from_a_file(tmp_path):
    path = tmp_path / "schema.json"
    path.write_text(json.dumps(SCHEMA))
    scorer = build_scorer(f"json_schema:schema=@{path}")
    assert scorer.score('{"label": "negative"}', None) == 1.0
    with pytest.raises(ScorerError, match="cannot read"):
        build_scorer(f"json_schema:schema=@{tmp_path / 'missing.json'}")
    (tmp_path / "bad.json").write_text("{nope")
    with pytest.raises(ScorerError, match="is not JSON"):
        build_scorer(f"json_schema:schema=@{tmp_path / 'bad.json'}")


@pytest.mark.parametrize("spec, message", [
    ({"type": "levenshtein"}, "unknown scorer type 'levenshtein' .known: contains, exact_match"),
    ({"pattern": "x"}, "needs a type"),
    ({"type": ""}, "needs a type"),
    ("", "has no type"),
    (42, "is an object with a type"),
    ({"type": "exact_match", "lowercas": True}, "unknown option 'lowercas' .allowed: .*lowercase"),
    ({"type": "exact_match", "lowercase": "sometimes"}, "option 'lowercase' must be true or false"),
    ({"type": "exact_match", "normalize": ["lowercase", "stem"]}, "unknown normalisation 'stem'"),
    ({"type": "exact_match", "normalize": 3}, "must be a list of names"),
    ({"type": "contains", "require": "most"}, "must be one of any, all, fraction"),
    ({"type": "regex", "pattern": 5}, "option 'pattern' must be a string"),
    ({"type": "json_field", "field": "a..b"}, "cannot parse the field path"),
    ({"type": "exact_match", "name": ""}, "name must be a non-empty string"),
    ("exact_match:lowercase", "is not key=value"),
    ("{not json", "is not valid JSON"),
])
def test_bad_specs_raise_clear_value_errors(spec, message):
    with pytest.raises(ValueError, match=message):
        build_scorer(spec)


def test_expectations_that_a_scorer_cannot_use():
    with pytest.raises(ScorerError, match="needs an expected answer"):
        build_scorer("exact_match").check(None)
    with pytest.raises(ScorerError, match="must be a string or a list of strings"):
        build_scorer("exact_match").check({"a": 1})
    with pytest.raises(ScorerError, match="empty list"):
        build_scorer("contains").check([])


def test_names_are_unique_and_specs_round_trip():
    scorers = build_scorers(["regex:pattern=a", "regex:pattern=b", {"type": "exact_match", "name": "strict"}])
    assert [s.name for s in scorers] == ["regex", "regex_2", "strict"]
    assert scorers[1].score("b", None) == 1.0 and scorers[1].score("a", None) == 0.0
    for s in scorers:
        assert build_scorer(s.spec) == s
    assert build_scorer("exact_match:lowercase=true") == build_scorer({"type": "exactMatch", "lowercase": True})
    assert build_scorer("exact_match") != build_scorer("exact_match:lowercase=true")
    with pytest.raises(ScorerError, match="at least one scorer"):
        build_scorers([])


def test_registry_takes_new_scorers():
    @register_scorer
    class Length(Scorer):
        type = "test_length_at_most"
        OPTIONS = ("max",)

        def configure(self, opts):
            self.max = int(opts.text("max", "10"))

        def score(self, response, expected):
            return 1.0 if len(response) <= self.max else 0.0

    try:
        assert build_scorer("test_length_at_most:max=3").score("abcd", None) == 0.0
        assert build_scorer({"type": "test_length_at_most"}).score("abcd", None) == 1.0
    finally:
        SCORERS.pop("test_length_at_most")
