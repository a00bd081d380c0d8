"""Datasets, scorers and the async runner that queries OpenAI-compatible endpoints.

The rollout's path through it: cases from `parse_jsonl` / `parse_cases` / `load_s3_jsonl`, a
deterministic `sample(cases, n, derive_seed(...))`, scorers from `build_scorers(specs)`, then
`evaluate_paired(cases, stable, candidate, scorers, batch_size=..., stop_when=...)` (or
`iter_paired_batches`) against the revisions' pod IPs; `PairedRun.differences()` feeds the decision
statistics. Live traffic: `scrape(url)` twice and `window_stats(before, after)`.
"""

from slmfleet.evaluation.dataset import (
    Case,
    DatasetError,
    Message,
    derive_seed,
    load_file,
    load_s3_jsonl,
    parse_case,
    parse_cases,
    parse_jsonl,
    sample,
)
from slmfleet.evaluation.metrics import (
    MetricsParseError,
    Sample,
    Scrape,
    ScrapeError,
    WindowStats,
    parse_exposition,
    quantile_from_buckets,
    scrape,
    window_stats,
)
from slmfleet.evaluation.runner import (
    Answer,
    CaseResult,
    Endpoint,
    EndpointError,
    EvalRun,
    PairedRun,
    SideResult,
    SideSummary,
    batch_ends,
    evaluate,
    evaluate_paired,
    iter_batches,
    iter_paired_batches,
    list_models,
    percentile,
)
from slmfleet.evaluation.scorers import (
    SCORERS,
    Normalization,
    Scorer,
    ScorerError,
    build_scorer,
    build_scorers,
    parse_scorer_string,
    register_scorer,
)

__all__ = [
    "SCORERS",
    "Answer",
    "Case",
    "CaseResult",
    "DatasetError",
    "Endpoint",
    "EndpointError",
    "EvalRun",
    "Message",
    "MetricsParseError",
    "Normalization",
    "PairedRun",
    "Sample",
    "Scorer",
    "ScorerError",
    "Scrape",
    "ScrapeError",
    "SideResult",
    "SideSummary",
    "WindowStats",
    "batch_ends",
    "build_scorer",
    "build_scorers",
    "derive_seed",
    "evaluate",
    "evaluate_paired",
    "iter_batches",
    "iter_paired_batches",
    "list_models",
    "load_file",
    "load_s3_jsonl",
    "parse_case",
    "parse_cases",
    "parse_exposition",
    "parse_jsonl",
    "percentile",
    "quantile_from_buckets",
    "parse_scorer_string",
    "register_scorer",
    "sample",
    "scrape",
    "window_stats",
]
