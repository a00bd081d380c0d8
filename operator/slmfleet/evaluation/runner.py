"""The async runner: send cases to OpenAI-compatible endpoints (vLLM), score the answers.

- Chat cases POST `/v1/chat/completions` with `{model, messages, temperature: 0, max_tokens}`;
  prompt cases POST `/v1/completions` with `{model, prompt, temperature: 0, max_tokens}`.
- `evaluate_paired` sends every case to both the stable and the candidate (paired: the same cases,
  scored the same way). Each endpoint has its own semaphore of `concurrency` requests in flight, so
  both see the same load and their latencies compare. Both requests of a case go out together.
- Every attempt has its own `timeout` (seconds, the whole request: connect, send, answer).
- Retries: none for an HTTP status (a 4xx is a wrong request and stays wrong; a 5xx is the model
  failing, which the error rate must count, not hide) and none for a timeout (a slow answer is a
  latency failure; asking again would double the wait). One retry for a connection error (refused,
  reset, a pooled keep-alive connection the server had closed), which is how a healthy server
  looks when a connection was merely stale; a second failure is recorded.
- Results per case and side: latency (seconds, from sending to the whole body, for the attempt
  that answered), the error (kind `http` with the status, `timeout`, `connection`, or `protocol`
  for a body that is not a completion or is too large), and a score per scorer. A failed request
  scores 0 on every scorer: a user would have got no answer. The answer's text is dropped once it
  is scored (`keep_text` keeps it, for `slmfleet eval`): a run, however long, holds scores and the
  statistics' inputs, never the answers.
- Every read is bounded. `max_tokens` is at most MAX_TOKENS_LIMIT (the ModelRollout API's bound),
  and an answer is read in chunks up to `answer_byte_limit(max_tokens)` bytes (64 KiB plus 64
  bytes a token, 4 MiB at most) whether or not it has a Content-Length; a longer one is a
  `protocol` error and the rest of it is never read. Error bodies are read up to ERROR_BODY_BYTES
  and only their first MAX_DETAIL characters are kept.
- The case's score (`score`) is its FIRST scorer's: that one decides, the others are reported (the
  ModelRollout API says the same). Per-scorer means are reported alongside.
- Batches: `iter_paired_batches` yields the cumulative run after each batch, of `batch_size` cases
  or ending at each of `looks` (cumulative counts such as a group-sequential plan's look sizes);
  `evaluate_paired(..., looks=[75, 150, 225, 300], stop_when=f)` stops after the first batch for
  which `f(run)` is true and returns the partial run (`run.complete` is False). Sequential decisions
  live in the rollout layer; this only makes stopping possible.
- The HTTP client ignores proxy settings in the environment: evaluations go straight to the pods.
- Scoring never runs on the event loop: each answer is scored on one of SCORING_THREADS threads
  shared by every evaluation of the process (and the dataset is checked against the scorers there
  too), so a slow scorer holds a thread, not the loop that serves watches, workers and /healthz.
  Tenant regexes run on RE2 in linear time and JSON Schema validation has a step budget (see
  scorers), so no scorer holds a thread for long either.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import itertools
import json
import math
import statistics
import time
from collections.abc import AsyncGenerator, AsyncIterator, Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from slmfleet.evaluation.dataset import Case, DatasetError
from slmfleet.evaluation.scorers import Scorer, build_scorers, check_expected, score_all

DEFAULT_CONCURRENCY = 8
DEFAULT_TIMEOUT = 30.0
DEFAULT_MAX_TOKENS = 256
CONNECTION_RETRIES = 1
MAX_TOKENS_LIMIT = 32768
"""The largest max_tokens a run asks for (the ModelRollout API's own bound on maxTokens)."""
ANSWER_BASE_BYTES = 64 * 1024
ANSWER_BYTES_PER_TOKEN = 64  # a token is a few bytes of text; JSON escapes make some of them six
MAX_ANSWER_BYTES = 4 * 1024 * 1024
"""The most bytes of a completion's body ever read (also the limit without max_tokens)."""
ERROR_BODY_BYTES = 16 * 1024
MODEL_LIST_BYTES = 1024 * 1024
MAX_DETAIL = 200
"""Characters of an error's detail that are kept (some come from the server's body)."""
SCORING_THREADS = 4
"""Threads that score answers, shared by every evaluation of the process."""

ERROR_HTTP, ERROR_TIMEOUT, ERROR_CONNECTION, ERROR_PROTOCOL = "http", "timeout", "connection", "protocol"


@dataclass(frozen=True)
class Endpoint:
    """An OpenAI-compatible server (`http://10.0.0.5:8000`; a trailing `/v1` is fine) and the model
    name to ask for. `api_key`, if any, goes in `Authorization: Bearer` and never into reprs."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)

    def url(self, path: str) -> str:
        base = self.base_url.rstrip("/")
        if base.endswith("/v1") and path.startswith("/v1/"):
            base = base[:-3]
        return base + path

    def headers(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.api_key}"} if self.api_key else {}


@dataclass(frozen=True, slots=True)
class Answer:
    """One request's outcome: text, or an error."""

    text: str | None
    latency_s: float | None
    error: str | None = None  # ERROR_HTTP | ERROR_TIMEOUT | ERROR_CONNECTION | ERROR_PROTOCOL
    status: int | None = None
    detail: str = ""
    attempts: int = 1

    @property
    def ok(self) -> bool:
        return self.error is None

    def describe_error(self) -> str | None:
        if self.error is None:
            return None
        head = f"HTTP {self.status}" if self.error == ERROR_HTTP else self.error
        return f"{head}: {self.detail}" if self.detail else head


@dataclass(frozen=True, slots=True)
class SideResult:
    """A case on one side: the answer (its text dropped once scored, unless kept), a score per
    scorer, and the deciding (first) score."""

    answer: Answer
    scores: Mapping[str, float]
    score: float

    def to_dict(self, text: bool = True) -> dict[str, Any]:
        out: dict[str, Any] = {"score": self.score, "scores": dict(self.scores),
                               "latency_s": self.answer.latency_s, "error": self.answer.describe_error()}
        if text:
            out["text"] = self.answer.text
        return out


@dataclass(frozen=True, slots=True)
class CaseResult:
    """A case sent to the stable and the candidate."""

    case_id: str
    stable: SideResult
    candidate: SideResult

    @property
    def difference(self) -> float:
        return self.candidate.score - self.stable.score


def percentile(values: Iterable[float], q: float) -> float | None:
    """Nearest-rank percentile (the smallest value with at least q of the values at or below it)."""
    data = sorted(values)
    if not data:
        return None
    rank = max(1, math.ceil(q * len(data) - 1e-9))
    return data[rank - 1]


@dataclass(frozen=True)
class SideSummary:
    """Means and rates over one side's results. Latency is over answered requests only; the
    error rate counts every failed request (HTTP status, timeout, connection, protocol)."""

    n: int
    score: float | None
    scores: dict[str, float]
    errors: int
    error_rate: float | None
    errors_by_kind: dict[str, int]
    mean_latency_s: float | None
    p95_latency_s: float | None

    @classmethod
    def of(cls, results: Sequence[SideResult]) -> SideSummary:
        n = len(results)
        per_scorer: dict[str, list[float]] = {}
        for r in results:
            for name, value in r.scores.items():
                per_scorer.setdefault(name, []).append(value)
        latencies = [r.answer.latency_s for r in results if r.answer.ok and r.answer.latency_s is not None]
        kinds: dict[str, int] = {}
        for r in results:
            if r.answer.error:
                kinds[r.answer.error] = kinds.get(r.answer.error, 0) + 1
        errors = sum(kinds.values())
        return cls(
            n=n,
            score=statistics.fmean(r.score for r in results) if n else None,
            scores={name: statistics.fmean(v) for name, v in per_scorer.items()},
            errors=errors,
            error_rate=errors / n if n else None,
            errors_by_kind=kinds,
            mean_latency_s=statistics.fmean(latencies) if latencies else None,
            p95_latency_s=percentile(latencies, 0.95),
        )

    def to_dict(self) -> dict[str, Any]:
        return {"n": self.n, "score": self.score, "scores": dict(self.scores), "errors": self.errors,
                "error_rate": self.error_rate, "errors_by_kind": dict(self.errors_by_kind),
                "mean_latency_s": self.mean_latency_s, "p95_latency_s": self.p95_latency_s}


@dataclass(frozen=True)
class PairedRun:
    """Results of a paired evaluation so far (`planned` cases were asked for)."""

    results: tuple[CaseResult, ...]
    planned: int

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def complete(self) -> bool:
        return self.n >= self.planned

    @property
    def stable(self) -> SideSummary:
        return SideSummary.of([r.stable for r in self.results])

    @property
    def candidate(self) -> SideSummary:
        return SideSummary.of([r.candidate for r in self.results])

    def stable_scores(self) -> list[float]:
        return [r.stable.score for r in self.results]

    def candidate_scores(self) -> list[float]:
        return [r.candidate.score for r in self.results]

    def differences(self) -> list[float]:
        """candidate - stable per case, in case order: what a paired test works on."""
        return [r.difference for r in self.results]

    @property
    def mean_difference(self) -> float | None:
        return statistics.fmean(self.differences()) if self.results else None

    def to_dict(self, cases: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "planned": self.planned, "complete": self.complete,
                               "stable": self.stable.to_dict(), "candidate": self.candidate.to_dict(),
                               "difference": self.mean_difference}
        if cases:
            out["cases"] = [{"id": r.case_id, "difference": r.difference, "stable": r.stable.to_dict(),
                             "candidate": r.candidate.to_dict()} for r in self.results]
        return out


@dataclass(frozen=True)
class EvalRun:
    """Results of a single-endpoint evaluation so far."""

    results: tuple[tuple[str, SideResult], ...]
    planned: int

    @property
    def n(self) -> int:
        return len(self.results)

    @property
    def complete(self) -> bool:
        return self.n >= self.planned

    @property
    def summary(self) -> SideSummary:
        return SideSummary.of([r for _, r in self.results])

    def to_dict(self, cases: bool = False) -> dict[str, Any]:
        out: dict[str, Any] = {"n": self.n, "planned": self.planned, "complete": self.complete,
                               "summary": self.summary.to_dict()}
        if cases:
            out["cases"] = [{"id": cid, **r.to_dict()} for cid, r in self.results]
        return out


# --- preparing --------------------------------------------------------------------------------------


def _prepare(cases: Iterable[Case], scorers: Iterable[Any] | None) -> tuple[list[Case], tuple[Scorer, ...]]:
    """Cases as a list and the default scorers built; every case's expectation checked against the
    scorers that will score it, so a bad dataset fails before any request."""
    cases = list(cases)
    default = build_scorers(scorers) if scorers is not None else ()
    problems = []
    for case in cases:
        used = case.scorers if case.scorers is not None else default
        if not used:
            problems.append(f"case {case.id!r}: no scorers (give scorers to the run or to the case)")
            continue
        problems.extend(f"case {case.id!r}: {p}" for p in check_expected(used, case.expected))
    if problems:
        more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
        raise DatasetError("; ".join(problems[:5]) + more)
    return cases, default


@functools.cache
def _scoring_threads() -> ThreadPoolExecutor:
    return ThreadPoolExecutor(SCORING_THREADS, thread_name_prefix="slmfleet-score")


async def off_the_loop(fn: Callable[..., Any], *args: Any) -> Any:
    """`fn(*args)` on a scoring thread: what scores answers or checks cases against scorers."""
    return await asyncio.get_running_loop().run_in_executor(_scoring_threads(), fn, *args)


async def _prepared(cases: Iterable[Case], scorers: Iterable[Any] | None) -> tuple[list[Case], tuple[Scorer, ...]]:
    prepared: tuple[list[Case], tuple[Scorer, ...]] = await off_the_loop(_prepare, cases, scorers)
    return prepared


def _positive_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 1


def _check_settings(concurrency: int, timeout: float) -> None:
    if not _positive_int(concurrency):
        raise ValueError(f"concurrency must be a positive integer, not {concurrency!r}")
    if not timeout or timeout <= 0:
        raise ValueError(f"timeout must be positive, not {timeout!r}")


def batch_ends(total: int, batch_size: int | None = None, looks: Sequence[int] | None = None) -> list[int]:
    """Cumulative case counts at which batches end: every `batch_size` cases, or at the `looks`
    (strictly increasing counts, e.g. a group-sequential plan's look sizes; counts past `total` are
    dropped), and always at `total`. Neither: one batch."""
    if batch_size is not None and looks is not None:
        raise ValueError("give batch_size or looks, not both")
    if batch_size is not None:
        if not _positive_int(batch_size):
            raise ValueError(f"batch size must be a positive integer, not {batch_size!r}")
        ends = list(range(batch_size, total, batch_size))
    elif looks is not None:
        looks = list(looks)
        if not all(_positive_int(k) for k in looks) or any(b <= a for a, b in itertools.pairwise(looks)):
            raise ValueError(f"looks must be strictly increasing positive integers, not {looks!r}")
        ends = [k for k in looks if k < total]
    else:
        ends = []
    return ends + [total] if total else []


# --- the client -------------------------------------------------------------------------------------


class _ConnectionFailed(Exception):
    pass


class _TooLarge(Exception):
    pass


def answer_byte_limit(max_tokens: int | None) -> int:
    """The most bytes of a completion body read for `max_tokens` (None: the server's default)."""
    if max_tokens is None:
        return MAX_ANSWER_BYTES
    return min(MAX_ANSWER_BYTES, ANSWER_BASE_BYTES + ANSWER_BYTES_PER_TOKEN * max_tokens)


async def read_capped(resp: aiohttp.ClientResponse, limit: int, *, truncate: bool = False) -> bytes:
    """The body, read in chunks up to `limit` bytes whatever Content-Length says (or whether there
    is one); past it `_TooLarge`, or with `truncate` the first `limit` bytes. The rest is never read
    (the connection is then closed, not reused)."""
    if not truncate and resp.content_length is not None and resp.content_length > limit:
        raise _TooLarge()
    buf = bytearray()
    while len(buf) <= limit:
        chunk = await resp.content.read(min(64 * 1024, limit + 1 - len(buf)))
        if not chunk:
            return bytes(buf)
        buf += chunk
    if truncate:
        return bytes(buf[:limit])
    raise _TooLarge()


def _detail(text: str) -> str:
    return text if len(text) <= MAX_DETAIL else text[:MAX_DETAIL] + "..."


def _error_message(raw: bytes) -> str:
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError):
        return raw[:200].decode("utf-8", "replace").strip()
    if isinstance(body, dict):
        msg = body.get("message")
        if msg is None and isinstance(body.get("error"), dict):
            msg = body["error"].get("message")
        if isinstance(msg, str):
            return msg[:200]
    return raw[:200].decode("utf-8", "replace").strip()


def _completion_text(body: Any, chat: bool) -> str:
    choice = body["choices"][0]
    if chat:
        content = choice["message"].get("content")
        return "" if content is None else str(content)
    return str(choice["text"])


class Client:
    """Requests to OpenAI-compatible endpoints over one aiohttp session, bounded per endpoint."""

    def __init__(self, session: aiohttp.ClientSession, *, concurrency: int = DEFAULT_CONCURRENCY,
                 timeout: float = DEFAULT_TIMEOUT, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                 connection_retries: int = CONNECTION_RETRIES, keep_text: bool = False,
                 max_answer_bytes: int | None = None) -> None:
        if max_tokens is not None and not (_positive_int(max_tokens) and max_tokens <= MAX_TOKENS_LIMIT):
            raise ValueError(f"max_tokens must be an integer from 1 to {MAX_TOKENS_LIMIT}, not {max_tokens!r}")
        self.session = session
        self.concurrency = concurrency
        self.timeout = timeout
        self.max_tokens = max_tokens
        self.connection_retries = connection_retries
        self.keep_text = keep_text
        self.max_answer_bytes = answer_byte_limit(max_tokens) if max_answer_bytes is None else max_answer_bytes
        self._semaphores: dict[tuple[str, str], asyncio.Semaphore] = {}

    def _semaphore(self, endpoint: Endpoint) -> asyncio.Semaphore:
        key = (endpoint.base_url, endpoint.model)
        if key not in self._semaphores:
            self._semaphores[key] = asyncio.Semaphore(self.concurrency)
        return self._semaphores[key]

    def request_body(self, endpoint: Endpoint, case: Case) -> tuple[str, dict[str, Any]]:
        body: dict[str, Any] = {"model": endpoint.model, "temperature": 0}
        if case.messages is not None:
            path = "/v1/chat/completions"
            body["messages"] = [m.to_dict() for m in case.messages]
        else:
            path = "/v1/completions"
            body["prompt"] = case.prompt
        if self.max_tokens is not None:
            body["max_tokens"] = self.max_tokens
        return path, body

    async def ask(self, endpoint: Endpoint, case: Case) -> Answer:
        """One case to one endpoint, within the endpoint's concurrency."""
        path, body = self.request_body(endpoint, case)
        async with self._semaphore(endpoint):
            attempts = 0
            while True:
                attempts += 1
                try:
                    answer = await self._once(endpoint.url(path), body, endpoint.headers(), case.kind == "chat")
                except _ConnectionFailed as exc:
                    if attempts <= self.connection_retries:
                        continue
                    return Answer(None, None, ERROR_CONNECTION, detail=_detail(str(exc)), attempts=attempts)
                return Answer(answer.text, answer.latency_s, answer.error, answer.status, answer.detail, attempts)

    async def _once(self, url: str, body: dict[str, Any], headers: dict[str, str], chat: bool) -> Answer:
        started = time.perf_counter()
        try:
            async with self.session.post(url, json=body, headers=headers,
                                         timeout=aiohttp.ClientTimeout(total=self.timeout)) as resp:
                status = resp.status
                if status >= 400:
                    raw = await read_capped(resp, ERROR_BODY_BYTES, truncate=True)
                else:
                    raw = await read_capped(resp, self.max_answer_bytes)
        except _TooLarge:
            return Answer(None, time.perf_counter() - started, ERROR_PROTOCOL, status=status,
                          detail=f"the answer is larger than {self.max_answer_bytes} bytes")
        except TimeoutError:  # aiohttp's timeouts are TimeoutErrors too (checked before connection errors)
            return Answer(None, None, ERROR_TIMEOUT, detail=f"no answer within {self.timeout:g} s")
        except aiohttp.ClientConnectionError as exc:
            raise _ConnectionFailed(_detail(f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__)) from exc
        except aiohttp.ClientError as exc:
            return Answer(None, None, ERROR_PROTOCOL, detail=_detail(f"{type(exc).__name__}: {exc}"))
        latency = time.perf_counter() - started
        if status >= 400:
            return Answer(None, latency, ERROR_HTTP, status=status, detail=_error_message(raw))
        try:
            text = _completion_text(json.loads(raw), chat)
        except (ValueError, KeyError, IndexError, TypeError, AttributeError, RecursionError):
            return Answer(None, latency, ERROR_PROTOCOL, status=status,
                          detail=f"not a completion: {raw[:120].decode('utf-8', 'replace')!r}")
        return Answer(text, latency, status=status)

    async def result(self, endpoint: Endpoint, case: Case, default: Sequence[Scorer]) -> SideResult:
        answer = await self.ask(endpoint, case)
        scorers = case.scorers if case.scorers is not None else default
        if answer.ok:
            scores: dict[str, float] = await off_the_loop(score_all, scorers, answer.text or "", case.expected)
        else:
            scores = {s.name: 0.0 for s in scorers}
        # Scored: the text goes (unless kept), so a run holds scores, never answers.
        return SideResult(answer if self.keep_text else dataclasses.replace(answer, text=None),
                          scores, scores[scorers[0].name])

    async def run_batch(self, cases: Sequence[Case], endpoints: Sequence[Endpoint],
                        default: Sequence[Scorer]) -> list[list[SideResult]]:
        """Every case to every endpoint, concurrently within the bounds; results in case order."""
        try:
            async with asyncio.TaskGroup() as group:
                tasks = [[group.create_task(self.result(ep, case, default)) for ep in endpoints] for case in cases]
        except BaseExceptionGroup as group_error:  # a bug (requests' own failures are results): raise it plainly
            raise group_error.exceptions[0] from None
        return [[t.result() for t in row] for row in tasks]


@contextlib.asynccontextmanager
async def open_session(concurrency: int = DEFAULT_CONCURRENCY,
                       session: aiohttp.ClientSession | None = None) -> AsyncIterator[aiohttp.ClientSession]:
    """The given session, or a new one sized for two endpoints at `concurrency`, without proxies."""
    if session is not None:
        yield session
        return
    connector = aiohttp.TCPConnector(limit=max(2 * concurrency + 4, 16))
    async with aiohttp.ClientSession(connector=connector, trust_env=False) as own:
        yield own


# --- running ----------------------------------------------------------------------------------------


async def _batches(cases: Sequence[Case], endpoints: Sequence[Endpoint], default: Sequence[Scorer], *,
                   ends: Sequence[int], concurrency: int, timeout: float, max_tokens: int | None,
                   connection_retries: int, session: aiohttp.ClientSession | None, keep_text: bool = False,
                   ) -> AsyncGenerator[list[tuple[str, list[SideResult]]], None]:
    async with open_session(concurrency, session) as s:
        client = Client(s, concurrency=concurrency, timeout=timeout, max_tokens=max_tokens,
                        connection_retries=connection_retries, keep_text=keep_text)
        start = 0
        for end in ends:
            batch = cases[start:end]
            start = end
            rows = await client.run_batch(batch, endpoints, default)
            yield [(case.id, row) for case, row in zip(batch, rows, strict=True)]


async def iter_paired_batches(cases: Iterable[Case], stable: Endpoint, candidate: Endpoint,
                              scorers: Iterable[Any] | None = None, *, batch_size: int | None = None,
                              looks: Sequence[int] | None = None,
                              concurrency: int = DEFAULT_CONCURRENCY, timeout: float = DEFAULT_TIMEOUT,
                              max_tokens: int | None = DEFAULT_MAX_TOKENS,
                              connection_retries: int = CONNECTION_RETRIES,
                              session: aiohttp.ClientSession | None = None,
                              keep_text: bool = False) -> AsyncGenerator[PairedRun, None]:
    """The cumulative PairedRun after each batch (every `batch_size` cases, or at each of `looks`,
    cumulative counts; see `batch_ends`), in case order. Breaking out of the loop stops the
    evaluation (no request is in flight between batches); close the generator
    (`contextlib.aclosing`) to release its HTTP session at once."""
    _check_settings(concurrency, timeout)
    cases, default = await _prepared(cases, scorers)
    ends = batch_ends(len(cases), batch_size, looks)
    results: list[CaseResult] = []
    async with contextlib.aclosing(_batches(
            cases, (stable, candidate), default, ends=ends, concurrency=concurrency,
            timeout=timeout, max_tokens=max_tokens, connection_retries=connection_retries,
            session=session, keep_text=keep_text)) as batches:
        async for rows in batches:
            results.extend(CaseResult(cid, pair[0], pair[1]) for cid, pair in rows)
            yield PairedRun(tuple(results), planned=len(cases))


async def evaluate_paired(cases: Iterable[Case], stable: Endpoint, candidate: Endpoint,
                          scorers: Iterable[Any] | None = None, *, concurrency: int = DEFAULT_CONCURRENCY,
                          timeout: float = DEFAULT_TIMEOUT, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                          batch_size: int | None = None, looks: Sequence[int] | None = None,
                          stop_when: Callable[[PairedRun], bool] | None = None,
                          connection_retries: int = CONNECTION_RETRIES,
                          session: aiohttp.ClientSession | None = None, keep_text: bool = False) -> PairedRun:
    """Every case to both endpoints, scored with `scorers` (specs or built scorers; a case's own
    scorers replace them). With `batch_size` or `looks`, runs batch after batch and stops early once
    `stop_when(run_so_far)` is true; the result then has `complete == False`."""
    cases = list(cases)
    run = PairedRun((), planned=len(cases))
    async with contextlib.aclosing(iter_paired_batches(
            cases, stable, candidate, scorers, batch_size=batch_size, looks=looks,
            concurrency=concurrency, timeout=timeout, max_tokens=max_tokens,
            connection_retries=connection_retries, session=session, keep_text=keep_text)) as batches:
        async for run in batches:
            if stop_when is not None and not run.complete and stop_when(run):
                break
    return run


async def iter_batches(cases: Iterable[Case], endpoint: Endpoint, scorers: Iterable[Any] | None = None, *,
                       batch_size: int | None = None, looks: Sequence[int] | None = None,
                       concurrency: int = DEFAULT_CONCURRENCY,
                       timeout: float = DEFAULT_TIMEOUT, max_tokens: int | None = DEFAULT_MAX_TOKENS,
                       connection_retries: int = CONNECTION_RETRIES,
                       session: aiohttp.ClientSession | None = None,
                       keep_text: bool = False) -> AsyncGenerator[EvalRun, None]:
    """One endpoint: the cumulative EvalRun after each batch."""
    _check_settings(concurrency, timeout)
    cases, default = await _prepared(cases, scorers)
    ends = batch_ends(len(cases), batch_size, looks)
    results: list[tuple[str, SideResult]] = []
    async with contextlib.aclosing(_batches(
            cases, (endpoint,), default, ends=ends, concurrency=concurrency, timeout=timeout,
            max_tokens=max_tokens, connection_retries=connection_retries, session=session,
            keep_text=keep_text)) as batches:
        async for rows in batches:
            results.extend((cid, row[0]) for cid, row in rows)
            yield EvalRun(tuple(results), planned=len(cases))


async def evaluate(cases: Iterable[Case], endpoint: Endpoint, scorers: Iterable[Any] | None = None, *,
                   concurrency: int = DEFAULT_CONCURRENCY, timeout: float = DEFAULT_TIMEOUT,
                   max_tokens: int | None = DEFAULT_MAX_TOKENS, batch_size: int | None = None,
                   looks: Sequence[int] | None = None, stop_when: Callable[[EvalRun], bool] | None = None,
                   connection_retries: int = CONNECTION_RETRIES,
                   session: aiohttp.ClientSession | None = None, keep_text: bool = False) -> EvalRun:
    """Every case to one endpoint (a single-model evaluation)."""
    cases = list(cases)
    run = EvalRun((), planned=len(cases))
    async with contextlib.aclosing(iter_batches(
            cases, endpoint, scorers, batch_size=batch_size, looks=looks, concurrency=concurrency,
            timeout=timeout, max_tokens=max_tokens, connection_retries=connection_retries,
            session=session, keep_text=keep_text)) as batches:
        async for run in batches:
            if stop_when is not None and not run.complete and stop_when(run):
                break
    return run


class EndpointError(Exception):
    """An endpoint that could not say which models it serves."""


async def list_models(base_url: str, *, timeout: float = 10.0,
                      session: aiohttp.ClientSession | None = None) -> list[str]:
    """The model ids an endpoint serves (GET /v1/models)."""
    url = Endpoint(base_url, "").url("/v1/models")
    async with open_session(1, session) as s:
        try:
            async with s.get(url, timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
                status = resp.status
                raw = await read_capped(resp, MODEL_LIST_BYTES if status < 400 else ERROR_BODY_BYTES,
                                        truncate=status >= 400)
        except _TooLarge:
            raise EndpointError(f"{url}: the model list is larger than {MODEL_LIST_BYTES} bytes") from None
        except TimeoutError:
            raise EndpointError(f"{url}: no answer within {timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise EndpointError(_detail(f"{url}: {type(exc).__name__}: {exc}")) from None
    if status >= 400:
        raise EndpointError(f"{url}: HTTP {status}: {_error_message(raw)}")
    try:
        return [str(m["id"]) for m in json.loads(raw)["data"]]
    except (ValueError, KeyError, TypeError, RecursionError) as exc:
        raise EndpointError(_detail(f"{url}: not a model list ({exc})")) from None
