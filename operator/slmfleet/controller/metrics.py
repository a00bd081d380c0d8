"""The operator's Prometheus metrics and its /healthz + /metrics endpoint."""

from __future__ import annotations

from collections.abc import Callable

import prometheus_client as prom
from aiohttp import web

REGISTRY = prom.CollectorRegistry()

RECONCILES = prom.Counter(
    "slmfleet_reconciles", "Reconciles by kind and result (noop, changed, error)", ["kind", "result"], registry=REGISTRY
)
RECONCILE_SECONDS = prom.Histogram(
    "slmfleet_reconcile_duration_seconds",
    "Time to reconcile one object",
    ["kind"],
    buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10),
    registry=REGISTRY,
)
WEIGHT_VERIFICATION_FAILURES = prom.Counter(
    "slmfleet_weight_verification_failures",
    "Weights refused against their pin (digest, file hash, pickle format), by reason",
    ["reason"],
    registry=REGISTRY,
)
API_WRITES = prom.Counter("slmfleet_api_writes", "Write requests sent to the API server", ["verb"], registry=REGISTRY)
MODELS = prom.Gauge("slmfleet_models", "SmallModels by condition type and status", ["condition", "status"], registry=REGISTRY)
LEADER = prom.Gauge(
    "slmfleet_leader", "1 while this replica leads (and may write), 0 while it follows", registry=REGISTRY
)
GPUS_REQUESTED = prom.Gauge(
    "slmfleet_gpus_requested", "GPUs requested by served models, by product", ["product"], registry=REGISTRY
)

CANARY_WEIGHT = prom.Gauge(
    "slmfleet_rollout_canary_weight",
    "Percent of the traffic on the candidate revision",
    ["namespace", "rollout"],
    registry=REGISTRY,
)
EVALUATION_SCORE = prom.Gauge(
    "slmfleet_evaluation_score",
    "Mean score of the latest evaluation, by revision and scorer",
    ["namespace", "rollout", "role", "revision", "scorer"],
    registry=REGISTRY,
)
EVALUATION_VERDICTS = prom.Counter(
    "slmfleet_evaluation_verdicts",
    "Evaluation verdicts (pass, fail, error)",
    ["namespace", "rollout", "verdict"],
    registry=REGISTRY,
)
ROLLBACKS = prom.Counter(
    "slmfleet_rollbacks",
    "Candidates rolled back or refused, by reason",
    ["namespace", "rollout", "reason"],
    registry=REGISTRY,
)
PROMOTIONS = prom.Counter(
    "slmfleet_promotions", "Candidates promoted to stable", ["namespace", "rollout"], registry=REGISTRY
)


ROLLOUT_SERIES = (CANARY_WEIGHT, EVALUATION_SCORE, EVALUATION_VERDICTS, ROLLBACKS, PROMOTIONS)


def forget_rollout(namespace: str, rollout: str, keep_revisions: frozenset[str] = frozenset()) -> None:
    """Drop the series of a rollout that governs nothing any more (all of them), or those of its
    revisions other than `keep_revisions` (its scores), so /metrics does not grow with every
    rollout and revision there ever was."""
    for metric in ROLLOUT_SERIES:
        # prometheus_client has no public way to list a metric's children: its own attributes.
        names = metric._labelnames
        for labels in [dict(zip(names, values, strict=True)) for values in list(metric._metrics)]:
            if (labels["namespace"], labels["rollout"]) != (namespace, rollout):
                continue
            if keep_revisions and ("revision" not in labels or labels["revision"] in keep_revisions):
                continue
            metric.remove(*(labels[n] for n in names))


def publish_model_gauges(
    conditions: dict[tuple[str, str], dict[str, str]], gpus: dict[tuple[str, str], dict[str, int]]
) -> None:
    """Recompute the fleet-wide gauges from the latest per-model results."""
    counts: dict[tuple[str, str], int] = {}
    for per_model in conditions.values():
        for type_, status in per_model.items():
            counts[(type_, status)] = counts.get((type_, status), 0) + 1
    MODELS.clear()
    for (type_, status), n in counts.items():
        MODELS.labels(type_, status).set(n)
    totals: dict[str, int] = {}
    for gpus_of_model in gpus.values():
        for product, count in gpus_of_model.items():
            totals[product] = totals.get(product, 0) + count
    GPUS_REQUESTED.clear()
    for product, n in totals.items():
        GPUS_REQUESTED.labels(product).set(n)


async def serve(host: str, port: int, healthy: Callable[[], bool],
                before_scrape: Callable[[], None] | None = None) -> web.AppRunner:
    """/healthz and /metrics. `before_scrape` brings gauges computed from the whole fleet up to
    date: once per scrape, rather than on every reconcile (a pass over every model each time)."""
    async def healthz(_: web.Request) -> web.Response:
        ok = healthy()
        return web.Response(status=200 if ok else 503, text="ok\n" if ok else "not ready\n")

    async def metrics(_: web.Request) -> web.Response:
        if before_scrape is not None:
            before_scrape()
        return web.Response(body=prom.generate_latest(REGISTRY), headers={"Content-Type": prom.CONTENT_TYPE_LATEST})

    app = web.Application()
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/metrics", metrics)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, host, port).start()
    return runner
