"""Evaluations the operator runs in the background, and the live metrics watch of canary steps.

`Evaluations` runs one asyncio task per evaluation id (`rollout.steps.evaluation_id`): load the
cases (`load_cases`: inline, ConfigMap or S3), sample them deterministically, send every case to
the stable and the candidate pods in the group-sequential looks of `rollout.decision`, and stop at
the first look whose combined verdict (score decision + the candidate's latency and error rate) is
pass or fail. The outcome is kept per id and `on_done` is called once the outcome is stored, so
the handler can requeue the rollout. An outcome is one of

- `pass` / `fail`: the candidate's verdict, with an `EvaluationResult` wire dict for the status;
- `error`: the evaluation could not run (dataset missing, storage unreachable, the stable not
  answering): not the candidate's fault. `ensure` starts it again after `retry_errors_after`.

`LiveWatch` checks the candidate's live traffic during canary steps: the first check of a watch
scrapes every candidate pod's /metrics as a baseline, later checks compare with it (requests, 5xx
errors and the p95 of the e2e latency histogram, merged over the pods) against the thresholds.

Secret values (S3 credentials) are only handed to the S3 client: never logged, never in reasons.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

from slmfleet.api.config import S3EndpointRule
from slmfleet.api.modelrollout import Evaluation, EvaluationResult, S3Dataset, Thresholds
from slmfleet.controller.background import cancel_all
from slmfleet.controller.s3_access import S3AccessError, api_failure, s3_client_for
from slmfleet.evaluation import metrics as evaluation_metrics
from slmfleet.evaluation.dataset import (
    Case,
    DatasetError,
    derive_seed,
    load_s3_jsonl,
    parse_cases,
    parse_jsonl,
    sample,
)
from slmfleet.evaluation.metrics import Scrape, merge_buckets, quantile_from_buckets, window_stats
from slmfleet.evaluation.runner import Endpoint, PairedRun, iter_paired_batches
from slmfleet.evaluation.scorers import Scorer, ScorerError, build_scorers
from slmfleet.evaluation.stats import (
    DEFAULT_MIN_REQUESTS,
    METHOD,
    Decision,
    OperationalCheck,
    Verdict,
    alpha_from_confidence,
    check_operational,
    combine,
    decide,
    look_sizes,
)
from slmfleet.k8s.client import KubeClient

log = logging.getLogger(__name__)

RETRY_ERRORS_AFTER = 30.0
"""Seconds before an evaluation that could not run ("error") may be started again."""

OutcomeVerdict = Literal["pass", "fail", "error"]


@dataclass(frozen=True)
class EvaluationRequest:
    """What one evaluation step needs; `id` identifies it (`<candidateRevision>/step-<n>`)."""

    id: str
    namespace: str
    rollout: str
    rollout_uid: str
    step: int
    evaluation: Evaluation
    sample_size: int
    stable: Endpoint
    candidate: Endpoint
    stable_revision: str
    candidate_revision: str


@dataclass(frozen=True)
class EvaluationOutcome:
    """How an evaluation ended. `result` is an `EvaluationResult` wire dict (None for "error");
    `scores` the per-scorer means of both sides ({} for "error")."""

    id: str
    verdict: OutcomeVerdict
    reason: str
    result: dict[str, Any] | None
    scores: dict[str, dict[str, float]]
    finished_at: float  # time.monotonic()


def _error(request_id: str, reason: str) -> EvaluationOutcome:
    return EvaluationOutcome(request_id, "error", reason, None, {}, time.monotonic())


# ---------------------------------------------------------------------------------------------
# Cases


async def _s3_dataset_client(client: KubeClient, namespace: str, dataset: S3Dataset,
                             endpoints: Sequence[S3EndpointRule]) -> Any:
    try:
        return await s3_client_for(client, namespace, dataset.s3, endpoints)
    except S3AccessError as exc:
        raise DatasetError(str(exc)) from None


def _scorers(evaluation: Evaluation) -> tuple[Scorer, ...]:
    return build_scorers(s.model_dump(by_alias=True, exclude_none=True) for s in evaluation.scorers)


async def load_cases(client: KubeClient, request: EvaluationRequest,
                     endpoints: Sequence[S3EndpointRule] = ()) -> list[Case]:
    """The evaluation's cases from its dataset: inline, a ConfigMap key (JSONL) or an S3 JSONL
    object (its endpoint on the platform's allow-list, `endpoints`). Every expectation is checked
    against the scorers, off the event loop (per-case scorers compile patterns and check schemas).
    Raises DatasetError (or ScorerError) with where the problem is."""
    evaluation = request.evaluation
    dataset = evaluation.dataset
    scorers = _scorers(evaluation)
    namespace = request.namespace
    if dataset.inline is not None:
        inline = [c.model_dump(by_alias=True, exclude_none=True) for c in dataset.inline]
        return await asyncio.to_thread(parse_cases, inline, "inline", default_scorers=scorers)
    if dataset.config_map is not None:
        ref = dataset.config_map
        source = f"ConfigMap {namespace}/{ref.name}"
        try:
            data = await client.read_config_map(namespace, ref.name)
        except Exception as exc:  # noqa: BLE001 - missing, forbidden, API down: the dataset is unavailable
            raise DatasetError(f"{source}: cannot read ({api_failure(exc)})") from None
        if ref.key not in data:
            raise DatasetError(f"{source} has no key {ref.key!r}")
        return await asyncio.to_thread(parse_jsonl, data[ref.key], f"{source} key {ref.key}", default_scorers=scorers)
    if dataset.s3 is not None:
        s3 = await _s3_dataset_client(client, namespace, dataset.s3, endpoints)
        return await asyncio.to_thread(load_s3_jsonl, s3, dataset.s3.uri, default_scorers=scorers)
    raise DatasetError("the dataset has none of inline, configMap, s3")


# ---------------------------------------------------------------------------------------------
# One evaluation


def _decimal(value: float | None) -> str | None:
    return None if value is None else f"{value:.4f}"


def _side_scores(run: PairedRun) -> dict[str, dict[str, float]]:
    return {"stable": dict(run.stable.scores), "candidate": dict(run.candidate.scores)}


def _result(request: EvaluationRequest, run: PairedRun, planned: int, decision: Decision,
            verdict: str, reason: str) -> dict[str, Any]:
    r = decision.result
    stable, candidate = run.stable, run.candidate
    return EvaluationResult(
        step=request.step,
        n=run.n,
        planned=planned,
        stable_score=_decimal(r.stable_mean),
        candidate_score=_decimal(r.candidate_mean),
        difference=_decimal(r.difference),
        ci_low=_decimal(r.ci_low),
        ci_high=_decimal(r.ci_high),
        stable_p95_latency_seconds=_decimal(stable.p95_latency_s),
        candidate_p95_latency_seconds=_decimal(candidate.p95_latency_s),
        stable_error_rate=_decimal(stable.error_rate),
        candidate_error_rate=_decimal(candidate.error_rate),
        method=METHOD,
        verdict="Pass" if verdict == "pass" else "Fail",
        reason=reason,
    ).to_wire()


def _operational(run: PairedRun, thresholds: Thresholds, planned: int) -> OperationalCheck:
    """The candidate's latency and error rate over the requests of the run so far. An evaluation
    smaller than DEFAULT_MIN_REQUESTS is judged on all its cases."""
    side = run.candidate
    return check_operational(
        requests=side.n, errors=side.errors, p95_latency_seconds=side.p95_latency_s,
        max_p95_latency_seconds=thresholds.max_p95_latency_seconds, max_error_rate=thresholds.max_error_rate,
        min_requests=min(DEFAULT_MIN_REQUESTS, planned),
    )


def _stable_unreachable(request: EvaluationRequest, run: PairedRun) -> str | None:
    """Why the stable is not usable, when it failed on every request of the run."""
    if run.n == 0 or run.stable.errors < run.n:
        return None
    first = next((r.stable.answer.describe_error() for r in run.results if r.stable.answer.error), None)
    return (f"the stable revision {request.stable_revision} ({request.stable.base_url}) failed all "
            f"{run.n} requests of the first look ({first}); the evaluation cannot compare against it")


async def run_evaluation(request: EvaluationRequest, cases: Sequence[Case]) -> EvaluationOutcome:
    """Sample, run look by look, stop at the first pass or fail. Raises on a bad dataset or
    settings (the caller turns that into an "error" outcome)."""
    evaluation = request.evaluation
    thresholds = evaluation.thresholds
    if not cases:
        raise DatasetError("the dataset has no cases")
    planned = min(request.sample_size, len(cases))
    chosen = sample(cases, planned, derive_seed(request.rollout_uid, request.candidate_revision, request.step))
    alpha = alpha_from_confidence(evaluation.confidence)
    scorers = _scorers(evaluation)
    looks = look_sizes(planned)
    final: tuple[PairedRun, Decision, Verdict, str] | None = None
    async with contextlib.aclosing(iter_paired_batches(
            chosen, request.stable, request.candidate, scorers, looks=looks,
            concurrency=evaluation.concurrency, timeout=evaluation.request_timeout_seconds,
            max_tokens=evaluation.max_tokens)) as batches:
        first = True
        async for run in batches:
            if first:
                first = False
                unreachable = _stable_unreachable(request, run)
                if unreachable:
                    return _error(request.id, unreachable)
            # The group-sequential statistics are numeric work: off the event loop.
            decision = await asyncio.to_thread(
                functools.partial(decide, run.stable_scores(), run.candidate_scores(), margin=thresholds.margin,
                                  alpha=alpha, planned_n=planned, minimum_score=thresholds.min_score))
            operational = _operational(run, thresholds, planned)
            verdict, reason = combine(decision, operational)
            if operational.verdict == "fail":
                reason = f"candidate {reason}"
            final = (run, decision, verdict, reason)
            if verdict in ("pass", "fail"):
                break
    if final is None:  # pragma: no cover - a non-empty sample always gives a batch
        raise RuntimeError("the evaluation ran no cases")
    run, decision, verdict, reason = final
    if verdict not in ("pass", "fail"):  # pragma: no cover - the last look always decides
        raise RuntimeError(f"no verdict after {run.n} of {planned} cases: {reason}")
    return EvaluationOutcome(
        id=request.id, verdict=verdict, reason=reason,
        result=_result(request, run, planned, decision, verdict, reason),
        scores=_side_scores(run), finished_at=time.monotonic(),
    )


def evaluation_deadline(request: EvaluationRequest) -> float:
    """An overall limit on one evaluation: every case of the sample asked of both revisions at
    the request timeout, `concurrency` at a time, with as much again to spare. An evaluation that
    hangs past it ends as an error (held and retried, never a rollback)."""
    evaluation = request.evaluation
    rounds = math.ceil(request.sample_size / evaluation.concurrency)
    return 60.0 + 2 * 2 * rounds * evaluation.request_timeout_seconds


# ---------------------------------------------------------------------------------------------
# The background evaluations


class Evaluations:
    """One background task per evaluation id, its outcome kept until `forget`."""

    def __init__(self, load_cases: Callable[[EvaluationRequest], Awaitable[list[Case]]],
                 on_done: Callable[[EvaluationRequest, EvaluationOutcome], None], *,
                 retry_errors_after: float = RETRY_ERRORS_AFTER,
                 deadline: Callable[[EvaluationRequest], float] = evaluation_deadline) -> None:
        self._load_cases = load_cases
        self._deadline = deadline
        self._on_done = on_done
        self.retry_errors_after = retry_errors_after
        self._tasks: dict[str, asyncio.Task[None]] = {}
        self._outcomes: dict[str, EvaluationOutcome] = {}

    def ensure(self, request: EvaluationRequest) -> None:
        """Start the evaluation unless it runs or has an outcome (an "error" outcome older than
        `retry_errors_after` is started again). Call from within the event loop."""
        if self.running(request.id):
            return
        outcome = self._outcomes.get(request.id)
        if outcome is not None:
            if outcome.verdict != "error" or time.monotonic() - outcome.finished_at < self.retry_errors_after:
                return
            del self._outcomes[request.id]
        log.info("starting evaluation %s of %s/%s (%s vs %s, %d cases)", request.id, request.namespace,
                 request.rollout, request.candidate_revision, request.stable_revision, request.sample_size)
        self._tasks[request.id] = asyncio.get_running_loop().create_task(
            self._run(request), name=f"evaluation {request.namespace}/{request.rollout} {request.id}")

    def outcome(self, id: str) -> EvaluationOutcome | None:
        return self._outcomes.get(id)

    def running(self, id: str) -> bool:
        task = self._tasks.get(id)
        return task is not None and not task.done()

    def forget(self, keep: Callable[[str], bool]) -> None:
        """Drop the outcomes and cancel the tasks whose id `keep` rejects."""
        for id in [i for i in self._outcomes if not keep(i)]:
            del self._outcomes[id]
        for id in [i for i in self._tasks if not keep(i)]:
            task = self._tasks.pop(id)
            if not task.done():
                log.info("cancelling evaluation %s", id)
                task.cancel()

    async def close(self) -> None:
        """Cancel every running evaluation and wait for them to end."""
        await cancel_all(self._tasks)

    async def _run(self, request: EvaluationRequest) -> None:
        try:
            try:
                cases = await self._load_cases(request)
            except Exception as exc:  # noqa: BLE001 - a dataset that cannot be read is an "error"
                outcome = _error(request.id, f"dataset unavailable: {_describe(exc)}")
            else:
                deadline = self._deadline(request)
                try:
                    outcome = await asyncio.wait_for(run_evaluation(request, cases), deadline)
                except TimeoutError:
                    outcome = _error(request.id, f"the evaluation did not finish within {deadline:.0f}s")
        except asyncio.CancelledError:
            raise
        except (DatasetError, ScorerError) as exc:
            outcome = _error(request.id, f"invalid dataset or scorers: {_describe(exc)}")
        except Exception as exc:
            log.warning("evaluation %s failed", request.id, exc_info=True)
            outcome = _error(request.id, f"evaluation failed: {_describe(exc)}")
        finally:
            if self._tasks.get(request.id) is asyncio.current_task():
                del self._tasks[request.id]
        self._outcomes[request.id] = outcome
        log.info("evaluation %s of %s/%s: %s: %s", request.id, request.namespace, request.rollout,
                 outcome.verdict, outcome.reason)
        try:
            self._on_done(request, outcome)
        except Exception:
            log.exception("on_done of evaluation %s failed", request.id)


def _describe(exc: BaseException) -> str:
    text = str(exc)
    if isinstance(exc, ValueError) and text:  # DatasetError, ScorerError: already self-explanatory
        return text
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------
# Live metrics of the candidate during canary steps


@dataclass(frozen=True)
class LiveCheck:
    verdict: Literal["pass", "fail", "insufficient"]
    requests: int
    error_rate: float | None
    p95_latency_seconds: float | None
    reason: str  # why it failed, or what is missing


class LiveWatch:
    """Live requests, errors and p95 latency of the candidate pods since the watch began."""

    def __init__(self, scrape: Callable[[str], Awaitable[Scrape]] = evaluation_metrics.scrape, *,
                 min_requests: int = DEFAULT_MIN_REQUESTS) -> None:
        self._scrape = scrape
        self.min_requests = min_requests
        self._baselines: dict[str, dict[str, Scrape]] = {}  # watch id -> pod URL -> first scrape

    async def _scrape_all(self, urls: Sequence[str]) -> tuple[dict[str, Scrape], list[str]]:
        async def one(url: str) -> Scrape | str:
            try:
                return await self._scrape(url)
            except Exception as exc:  # noqa: BLE001 - one pod's scrape failing is not a regression
                return _describe(exc)

        results = await asyncio.gather(*(one(u) for u in urls))
        scrapes = {u: r for u, r in zip(urls, results, strict=True) if isinstance(r, Scrape)}
        failures = [r for r in results if isinstance(r, str)]
        return scrapes, failures

    async def check(self, watch_id: str, candidate_urls: Sequence[str], model: str,
                    thresholds: Thresholds) -> LiveCheck:
        """Scrape the candidate pods; the first call of a watch only takes the baselines."""
        urls = list(dict.fromkeys(candidate_urls))
        scrapes, failures = await self._scrape_all(urls)
        skipped = f"; skipped pods: {'; '.join(failures)}" if failures else ""
        baselines = self._baselines.get(watch_id)
        if baselines is None:
            self._baselines[watch_id] = dict(scrapes)
            return LiveCheck("insufficient", 0, None, None,
                             f"baseline taken of {len(scrapes)} of {len(urls)} candidate pods{skipped}")
        for gone in [u for u in baselines if u not in urls]:
            del baselines[gone]
        requests = errors = 0
        errors_known = True
        buckets: list[tuple[tuple[float, float], ...]] = []
        fresh = 0
        for url, now in scrapes.items():
            base = baselines.get(url)
            if base is None:
                baselines[url] = now  # a new pod: counts from here on
                fresh += 1
                continue
            stats = window_stats(base, now, model=model or None)
            if stats.reset:
                baselines[url] = now  # restarted: its counters began again
                fresh += 1
                continue
            requests += stats.requests
            if stats.errors is None:
                errors_known = False
            else:
                errors += stats.errors
            buckets.append(stats.latency_buckets)
        merged = merge_buckets(*buckets)
        p95 = quantile_from_buckets(0.95, merged) if merged else None
        errors = min(errors, requests)
        check = check_operational(
            requests=requests, errors=errors, p95_latency_seconds=p95,
            max_p95_latency_seconds=thresholds.max_p95_latency_seconds,
            max_error_rate=thresholds.max_error_rate if errors_known else None,
            min_requests=self.min_requests,
        )
        error_rate = check.error_rate if errors_known else None
        notes = (f"; {fresh} pod(s) (re)baselined" if fresh else "") + skipped
        if check.verdict == "pass":
            rate = "unknown (no http_requests_total)" if error_rate is None else f"{error_rate:.4f}"
            latency = "unknown" if p95 is None else f"{p95:.3f}s"
            reason = f"{requests} requests, error rate {rate}, p95 latency {latency}{notes}"
        else:
            reason = "; ".join(check.reasons) + notes
        return LiveCheck(check.verdict, requests, error_rate, p95, reason)

    def forget(self, keep: Callable[[str], bool]) -> None:
        for watch_id in [w for w in self._baselines if not keep(w)]:
            del self._baselines[watch_id]
