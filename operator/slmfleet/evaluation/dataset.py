"""Evaluation cases: parsing (JSONL text, inline lists, S3 JSONL objects) and deterministic sampling.

A case is one JSON object:

    {"id": "c1", "messages": [{"role": "user", "content": "2+2?"}], "expected": "4"}
    {"prompt": "The capital of France is", "expected": ["Paris", "paris"], "scorers": ["contains"]}

- `messages` (chat, sent to /v1/chat/completions; roles system, user, assistant; at least one user
  message) or `prompt` (sent to /v1/completions): exactly one of them.
- `expected`: a string or any JSON value (what the scorers compare with; the json scorers take
  objects or JSON text). Optional, because a `json_schema` scorer with its own schema needs none.
- `id`: optional; without it the case's position (`line-7` in a JSONL source, `case-3` inline).
  Ids must be unique within a dataset.
- `scorers`: optional per-case scorer specs that replace the run's scorers for this case.
- any other key is kept in `Case.extra` (tags, categories) and ignored by the runner.

Sampling is deterministic and independent of the order of the dataset: each case is ranked by
SHA-256(seed, the case's content), and a sample of n is the n best ranked. The same seed gives the
same cases, in the same order, every time (so an operator restarted mid-evaluation picks the same
cases); stable and candidate get the same cases because one sample serves both. Derive the seed
from what identifies the evaluation (`derive_seed(namespace, rollout, stable_rev, candidate_rev)`).
The ranked order is random, so the first k cases of a sample are themselves a random sample: the
runner's batches can stop early without bias.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from slmfleet.evaluation.scorers import Scorer, ScorerError, build_scorers, check_expected

ROLES = ("system", "user", "assistant")
MAX_S3_BYTES = 64 * 1024 * 1024


class DatasetError(ValueError):
    """Cases that cannot be used, with where they are (source and line or position)."""


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def to_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class Case:
    """One evaluation case: chat `messages` or a `prompt` (exactly one), and what is expected.

    `expected` may be a JSON object (a dict), so a Case compares by value but is not hashable then.
    """

    id: str
    expected: Any = None
    messages: tuple[Message, ...] | None = None
    prompt: str | None = None
    scorers: tuple[Scorer, ...] | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if (self.messages is None) == (self.prompt is None):
            raise DatasetError(f"case {self.id!r}: a case has either messages or a prompt")

    @property
    def kind(self) -> str:
        """`chat` (messages) or `completion` (prompt)."""
        return "chat" if self.messages is not None else "completion"

    @property
    def fingerprint(self) -> str:
        """SHA-256 of the case's content (input and expectation, not its id): the sampling key."""
        content = {"messages": [m.to_dict() for m in self.messages] if self.messages is not None else None,
                   "prompt": self.prompt, "expected": self.expected}
        canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False, default=str)
        return hashlib.sha256(canonical.encode()).hexdigest()

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"id": self.id}
        if self.messages is not None:
            out["messages"] = [m.to_dict() for m in self.messages]
        else:
            out["prompt"] = self.prompt
        if self.expected is not None:
            out["expected"] = self.expected
        if self.scorers is not None:
            out["scorers"] = [s.spec for s in self.scorers]
        return {**self.extra, **out}


def _messages(raw: Any, where: str) -> tuple[Message, ...]:
    if not isinstance(raw, list) or not raw:
        raise DatasetError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    out = []
    for i, m in enumerate(raw, 1):
        if not isinstance(m, Mapping):
            raise DatasetError(f"{where}: message {i} must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DatasetError(f"{where}: message {i} has role {role!r} (one of {', '.join(ROLES)})")
        if not isinstance(content, str):
            raise DatasetError(f"{where}: message {i} needs a string 'content'")
        unknown = set(m) - {"role", "content"}
        if unknown:
            raise DatasetError(f"{where}: message {i} has unknown keys {sorted(unknown)}")
        out.append(Message(role, content))
    if not any(m.role == "user" for m in out):
        raise DatasetError(f"{where}: 'messages' has no user message")
    return tuple(out)


def parse_case(raw: Any, *, default_id: str, where: str,
               default_scorers: Sequence[Scorer] | None = None) -> Case:
    """One case from its JSON object. `where` names it in errors ("cases.jsonl line 4").
    With `default_scorers`, the expectation is checked against the scorers that will score it."""
    if hasattr(raw, "model_dump"):  # a pydantic model of the API
        raw = raw.model_dump(by_alias=True, exclude_none=True)
    if not isinstance(raw, Mapping):
        kind = "an array" if isinstance(raw, list) else type(raw).__name__
        raise DatasetError(f"{where}: a case must be a JSON object, not {kind}")
    data = dict(raw)
    case_id = data.pop("id", None)
    if case_id is None:
        case_id = default_id
    elif isinstance(case_id, (int, str)) and not isinstance(case_id, bool) and str(case_id).strip():
        case_id = str(case_id).strip()
    else:
        raise DatasetError(f"{where}: 'id' must be a non-empty string or an integer")
    messages, prompt = data.pop("messages", None), data.pop("prompt", None)
    if (messages is None) == (prompt is None):
        raise DatasetError(f"{where}: a case needs either 'messages' or 'prompt'"
                           + ("" if messages is None else ", not both"))
    if prompt is not None and not isinstance(prompt, str):
        raise DatasetError(f"{where}: 'prompt' must be a string")
    scorer_specs = data.pop("scorers", None)
    scorers = None
    if scorer_specs is not None:
        if isinstance(scorer_specs, (str, Mapping)):
            scorer_specs = [scorer_specs]
        if not isinstance(scorer_specs, list):
            raise DatasetError(f"{where}: 'scorers' must be a list of scorer specs")
        try:
            scorers = build_scorers(scorer_specs)
        except ScorerError as exc:
            raise DatasetError(f"{where}: {exc}") from None
    expected = data.pop("expected", None)
    case = Case(id=case_id, expected=expected, messages=_messages(messages, where) if messages is not None else None,
                prompt=prompt, scorers=scorers, extra=data)
    effective = scorers if scorers is not None else default_scorers
    if effective:
        problems = check_expected(effective, expected)
        if problems:
            raise DatasetError(f"{where}: {'; '.join(problems)}")
    return case


def _unique(cases: list[tuple[Case, str]], source: str) -> list[Case]:
    first: dict[str, str] = {}
    for case, where in cases:
        if case.id in first:
            raise DatasetError(f"{where}: duplicate id {case.id!r} (first at {first[case.id]})")
        first[case.id] = where
    if not cases:
        raise DatasetError(f"{source}: no cases")
    return [c for c, _ in cases]


def parse_jsonl(text: str | bytes, source: str = "<jsonl>", *,
                default_scorers: Sequence[Scorer] | None = None) -> list[Case]:
    """Cases from JSONL text: one JSON object per line, blank lines skipped. Errors name the line."""
    if isinstance(text, bytes):
        try:
            text = text.decode("utf-8-sig")
        except UnicodeDecodeError as exc:
            raise DatasetError(f"{source}: not UTF-8 text (byte {exc.start})") from None
    text = text.removeprefix("\ufeff")
    parsed: list[tuple[Case, str]] = []
    for lineno, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        where = f"{source} line {lineno}"
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise DatasetError(f"{where}: not valid JSON: {exc.msg} (column {exc.colno})") from None
        except RecursionError:
            raise DatasetError(f"{where}: JSON nested too deeply") from None
        parsed.append((parse_case(raw, default_id=f"line-{lineno}", where=where,
                                  default_scorers=default_scorers), where))
    return _unique(parsed, source)


def parse_cases(items: Iterable[Any], source: str = "inline", *,
                default_scorers: Sequence[Scorer] | None = None) -> list[Case]:
    """Cases from a list of objects (dicts, or the API's pydantic models). Errors name the position."""
    if isinstance(items, (str, bytes, Mapping)):
        raise DatasetError(f"{source}: cases must be a list of objects")
    parsed = []
    for i, raw in enumerate(items, 1):
        where = f"{source} case {i}"
        parsed.append((parse_case(raw, default_id=f"case-{i}", where=where, default_scorers=default_scorers), where))
    return _unique(parsed, source)


def load_file(path: str | Path, *, default_scorers: Sequence[Scorer] | None = None) -> list[Case]:
    """Cases from a local file: JSONL, or a JSON array when the name ends in `.json`."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise DatasetError(f"cannot read {path}: {exc.strerror or exc}") from None
    if path.suffix.lower() == ".json":
        try:
            items = json.loads(data.decode("utf-8-sig"))
        except (UnicodeDecodeError, ValueError) as exc:
            raise DatasetError(f"{path}: not a JSON array of cases: {exc}") from None
        if not isinstance(items, list):
            raise DatasetError(f"{path}: not a JSON array of cases")
        return parse_cases(items, str(path), default_scorers=default_scorers)
    return parse_jsonl(data, str(path), default_scorers=default_scorers)


def split_s3_uri(uri: str) -> tuple[str, str]:
    """`s3://bucket/key.jsonl` -> (bucket, key); the key names one object."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise DatasetError(f"{uri!r} is not an s3://bucket/key URI")
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    if not bucket or not key or key.endswith("/"):
        raise DatasetError(f"{uri!r}: name one object, s3://bucket/path/cases.jsonl")
    return bucket, key


def _describe(exc: BaseException) -> str:
    """A storage error in one line (botocore's ClientError carries `response`), no credentials."""
    response = getattr(exc, "response", None)
    if isinstance(response, Mapping):
        err = response.get("Error", {}) or {}
        status = (response.get("ResponseMetadata", {}) or {}).get("HTTPStatusCode")
        code = err.get("Code") or "error"
        msg = err.get("Message") or ""
        return f"{code}{f' (HTTP {status})' if status else ''}{f': {msg}' if msg else ''}"
    return f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__


def load_s3_jsonl(client: Any, uri: str, *, max_bytes: int = MAX_S3_BYTES,
                  default_scorers: Sequence[Scorer] | None = None) -> list[Case]:
    """Cases from one JSONL object in S3-compatible storage, read with a boto3 S3 `client` (the
    caller configures it: endpoint, credentials, CA). Objects over `max_bytes` are refused."""
    bucket, key = split_s3_uri(uri)
    try:
        resp = client.get_object(Bucket=bucket, Key=key)
        size = resp.get("ContentLength")
        if isinstance(size, int) and size > max_bytes:
            raise DatasetError(f"{uri}: {size} bytes, more than the {max_bytes} bytes a dataset may have")
        body = resp["Body"]
        try:
            data = body.read(max_bytes + 1)
        finally:
            body.close()
    except DatasetError:
        raise
    except Exception as exc:  # botocore's errors, without importing botocore here
        raise DatasetError(f"{uri}: cannot read the dataset: {_describe(exc)}") from exc
    if len(data) > max_bytes:
        raise DatasetError(f"{uri}: more than the {max_bytes} bytes a dataset may have")
    return parse_jsonl(data, uri, default_scorers=default_scorers)


def derive_seed(*parts: object) -> str:
    """A seed from what identifies an evaluation, e.g. (namespace, rollout, stable, candidate, step)."""
    return hashlib.sha256("\x1f".join(str(p) for p in parts).encode()).hexdigest()[:16]


def sample(cases: Sequence[Case], n: int | None, seed: int | str) -> list[Case]:
    """The n cases ranked first by SHA-256(seed, fingerprint), in rank order (all of them when n is
    None or at least the dataset's size). Deterministic, independent of the dataset's order."""
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 1):
        raise ValueError(f"sample size must be a positive integer, not {n!r}")
    prefix = f"{seed}\x00".encode()
    ranked = sorted(range(len(cases)),
                    key=lambda i: (hashlib.sha256(prefix + cases[i].fingerprint.encode()).digest(), i))
    return [cases[i] for i in ranked[:n]]
