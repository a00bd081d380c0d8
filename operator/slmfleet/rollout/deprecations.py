"""Deprecated base models: the list, and which revision to fall back to.

The list lives in one ConfigMap that the Helm chart owns (key `deprecations.yaml`), so a platform
team deprecates a base model the GitOps way: a commit, reviewed, synced by Argo CD, cluster-wide.
A CRD per deprecation was the alternative; a ConfigMap needs no new API version, is readable by
`kubectl get cm -o yaml`, and a ValidatingAdmissionPolicy can take it as its parameter object.

    deprecations:
      - baseModel: Qwen/Qwen2.5-7B-Instruct
        reason: licence withdrawn upstream
        after: "2026-12-01"        # optional: deprecated from this date (UTC); absent = now

Parsing is strict (unknown keys, duplicates and bad dates are errors with the entry's position),
because a typo that silently un-deprecates a model is worse than a loud failure.
"""

from __future__ import annotations

import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import yaml

from slmfleet.api.smallmodel import BASE_MODEL_PATTERN

DATA_KEY = "deprecations.yaml"
_KEYS = {"baseModel", "reason", "after"}
_BASE_MODEL = re.compile(BASE_MODEL_PATTERN)
MAX_BASE_MODEL_LENGTH = 256
MAX_REASON_LENGTH = 512


def _shown(value: Any) -> str:
    """A bad value as an error may show it: quoted, bounded."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class DeprecationsError(ValueError):
    pass


@dataclass(frozen=True)
class Deprecation:
    base_model: str
    reason: str
    after: dt.date | None = None

    def active(self, now: dt.datetime) -> bool:
        return self.after is None or now.date() >= self.after


@dataclass(frozen=True)
class Deprecations:
    entries: tuple[Deprecation, ...] = ()

    def lookup(self, base_model: str | None, now: dt.datetime) -> Deprecation | None:
        """The active deprecation of `base_model` (compared case-insensitively), if any."""
        if not base_model:
            return None
        wanted = base_model.lower()
        return next((d for d in self.entries if d.base_model.lower() == wanted and d.active(now)), None)


def parse_deprecations(text: str | None) -> Deprecations:
    if not text or not text.strip():
        return Deprecations()
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise DeprecationsError(f"{DATA_KEY} is not YAML: {exc}") from exc
    if not isinstance(doc, Mapping) or set(doc) - {"deprecations"}:
        raise DeprecationsError(f"{DATA_KEY} must be a mapping with the single key 'deprecations'")
    raw = doc.get("deprecations") or []
    if not isinstance(raw, list):
        raise DeprecationsError("deprecations must be a list")
    entries: list[Deprecation] = []
    seen: set[str] = set()
    for i, item in enumerate(raw):
        where = f"deprecations[{i}]"
        if not isinstance(item, Mapping):
            raise DeprecationsError(f"{where} must be a mapping")
        unknown = set(item) - _KEYS
        if unknown:
            raise DeprecationsError(f"{where}: unknown keys {sorted(unknown)} (allowed: {sorted(_KEYS)})")
        base = item.get("baseModel")
        # As strict as spec.baseModel: an entry no model can match (a stray space, a bare '/')
        # would silently deprecate nothing.
        if not isinstance(base, str) or len(base) > MAX_BASE_MODEL_LENGTH or not _BASE_MODEL.fullmatch(base):
            raise DeprecationsError(f"{where}: baseModel must be 'org/name' as in spec.baseModel "
                                    f"(letters, digits, '.', '_', '-'), not {_shown(base)}")
        if base.lower() in seen:
            raise DeprecationsError(f"{where}: {base} is listed twice")
        seen.add(base.lower())
        reason = item.get("reason", "deprecated")
        if not isinstance(reason, str) or not reason.strip() or len(reason) > MAX_REASON_LENGTH:
            raise DeprecationsError(f"{where}: reason must be a non-empty string of at most {MAX_REASON_LENGTH} characters")
        entries.append(Deprecation(base_model=base, reason=reason.strip(), after=_date(item.get("after"), where)))
    return Deprecations(tuple(entries))


def _date(value: Any, where: str) -> dt.date | None:
    if value is None:
        return None
    if isinstance(value, dt.datetime):
        return value.date()
    if isinstance(value, dt.date):
        return value
    try:
        return dt.date.fromisoformat(str(value))
    except ValueError as exc:
        raise DeprecationsError(f"{where}: after must be a date like 2026-12-01, not {value!r}") from exc


@dataclass(frozen=True)
class HistoryEntry:
    """A revision the model has served, as the SmallModel's status history records it."""

    revision: str
    digest: str
    base_model: str | None
    outcome: str  # Promoted | RolledBack | Failed | Serving


def last_known_good(history: Iterable[HistoryEntry], deprecations: Deprecations, now: dt.datetime,
                    *, exclude: str | None = None) -> HistoryEntry | None:
    """The newest revision that passed its evaluation (was promoted or served) and whose base model
    is not deprecated; `history` is oldest first. None: keep serving what runs, and say so."""
    for entry in reversed(list(history)):
        if entry.revision == exclude or entry.outcome not in ("Promoted", "Serving"):
            continue
        if deprecations.lookup(entry.base_model, now) is None:
            return entry
    return None
