import datetime as dt

import pytest

from slmfleet.rollout.deprecations import (
    Deprecations,
    DeprecationsError,
    HistoryEntry,
    last_known_good,
    parse_deprecations,
)

NOW = dt.datetime(2026, 11, 21, 12, tzinfo=dt.UTC)
LIST = """
deprecations:
  - baseModel: Qwen/Qwen2.5-7B-Instruct
    reason: licence withdrawn upstream
  - baseModel: meta-llama/Llama-3.1-8B-Instruct
    reason: superseded
    after: 2027-01-01
"""


def test_lookup_is_case_insensitive_and_respects_dates():
    deps = parse_deprecations(LIST)
    assert deps.lookup("qwen/qwen2.5-7b-instruct", NOW).reason == "licence withdrawn upstream"
    assert deps.lookup("meta-llama/Llama-3.1-8B-Instruct", NOW) is None
    assert deps.lookup("meta-llama/Llama-3.1-8B-Instruct", NOW.replace(year=2027)) is not None
    assert deps.lookup(None, NOW) is None
    assert parse_deprecations("") == Deprecations()


@pytest.mark.parametrize("text, message", [
    ("deprecations: [{baseModel: Qwen/Q, reasn: typo}]", "unknown keys"),
    ("deprecations: [{baseModel: qwen}]", "org/name"),
    ("deprecations: [{baseModel: a/b}, {baseModel: A/B}]", "twice"),
    ("deprecations: [{baseModel: a/b, after: soon}]", "date"),
    ("models: []", "single key"),
    ("deprecations: {a: b}", "list"),
    ("deprecations: [{baseModel: '/'}]", "org/name"),
    ("deprecations: [{baseModel: 'Qwen/Qwen3-4B '}]", "org/name"),
    ("deprecations: [{baseModel: ' Qwen/Qwen3-4B'}]", "org/name"),
    ("deprecations: [{baseModel: 'Qwen//Qwen3-4B'}]", "org/name"),
    ("deprecations: [{baseModel: 42}]", "org/name"),
    ("deprecations: [{baseModel: a/b, reason: ''}]", "reason"),
    ("deprecations: [{baseModel: a/b, reason: [x]}]", "reason"),
])
def test_mistakes_are_loud(text, message):
    with pytest.raises(DeprecationsError, match=message):
        parse_deprecations(text)


def test_last_known_good_skips_deprecated_bases_failures_and_the_current_revision():
    deps = parse_deprecations(LIST)
    history = [
        HistoryEntry("r1", "sha256:1", "org/old", "Promoted"),
        HistoryEntry("r2", "sha256:2", "org/old", "RolledBack"),
        HistoryEntry("r3", "sha256:3", "Qwen/Qwen2.5-7B-Instruct", "Promoted"),
        HistoryEntry("r4", "sha256:4", "Qwen/Qwen2.5-7B-Instruct", "Serving"),
    ]
    assert last_known_good(history, deps, NOW, exclude="r4").revision == "r1"
    assert last_known_good(history[2:], deps, NOW) is None
