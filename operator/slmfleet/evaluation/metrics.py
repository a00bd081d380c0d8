"""Live metrics from a vLLM server's `/metrics`: parse the Prometheus text exposition, and from two
scrapes (before, after) compute what happened in between: requests, errors, the error rate and an
estimated p95 latency.

The names and labels are vLLM 0.32's (the e2e stand-in serves the same, held to a dump of the real
server's families, e2e/standin/vllm-metrics.json):

- `http_requests_total{handler, method, status="2xx"|"4xx"|"5xx"}` (vLLM's HTTP instrumentation):
  requests to the generation handlers (`/v1/chat/completions`, `/v1/completions`); 5xx are errors.
  4xx (a wrong model name, a too-long prompt) are the caller's mistakes: counted, not errors.
- `vllm:request_success_total{model_name, engine, finished_reason}`: completed requests (the fallback
  request count when the HTTP counter is missing; the error rate is then unknown).
- `vllm:e2e_request_latency_seconds` (histogram, by `model_name` and `engine`): the p95 is estimated
  from the bucket deltas the way PromQL's histogram_quantile does, by linear interpolation inside the
  bucket that holds the rank; a rank in the +Inf bucket gives the largest finite bound.

`engine` is the engine's index ("0" for a server with one engine; data parallelism runs several in one
server). Series are selected by the labels asked for (`model_name`), never by their whole label set, so
a model's counts are the sum over its engines and its buckets are summed by `le` over its engines
before the quantile is taken, as PromQL's `sum by (le)` does.

Counters that went down between the scrapes (the server restarted) count from zero, as PromQL's
increase() does, and the window says so (`reset`).

Bounds: a scrape reads at most MAX_SCRAPE_BYTES (4 MiB) of the body, in chunks, whether or not the
server sends a Content-Length; a larger page is a ScrapeError and the rest is never read. A parse
keeps at most MAX_SAMPLES samples. vLLM's page for one model is some 100-300 KB and a few thousand
samples, most of them histogram buckets.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp

E2E_LATENCY = "vllm:e2e_request_latency_seconds"
REQUEST_SUCCESS = "vllm:request_success_total"
HTTP_REQUESTS = "http_requests_total"
MAX_SCRAPE_BYTES = 4 * 1024 * 1024
MAX_SAMPLES = 100_000
GENERATION_HANDLERS = ("/v1/chat/completions", "/v1/completions")

Labels = tuple[tuple[str, str], ...]


class MetricsParseError(ValueError):
    """Text that is not the Prometheus exposition format."""


class ScrapeError(Exception):
    """A /metrics endpoint that did not answer with metrics."""


@dataclass(frozen=True)
class Sample:
    name: str
    labels: Labels  # sorted (name, value) pairs
    value: float

    def label(self, key: str) -> str | None:
        return dict(self.labels).get(key)

    def matches(self, selector: Mapping[str, str]) -> bool:
        own = dict(self.labels)
        return all(own.get(k) == v for k, v in selector.items())


_NAME = re.compile(r"[a-zA-Z_:][a-zA-Z0-9_:]*")
_LABEL_NAME = re.compile(r"[a-zA-Z_][a-zA-Z0-9_]*")
_ESCAPES = {"\\": "\\", '"': '"', "n": "\n"}


def _parse_labels(line: str, pos: int, lineno: int) -> tuple[Labels, int]:
    """Labels from `{` at `pos`; returns them and the position after `}`."""
    labels: dict[str, str] = {}
    pos += 1
    while True:
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if pos < len(line) and line[pos] == "}":
            return tuple(sorted(labels.items())), pos + 1
        m = _LABEL_NAME.match(line, pos)
        if not m:
            raise MetricsParseError(f"line {lineno}: expected a label name at column {pos + 1}")
        key = m.group()
        pos = m.end()
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if line[pos:pos + 1] == "=":
            pos += 1
            while pos < len(line) and line[pos] in " \t":
                pos += 1
            quoted = line[pos:pos + 1] == '"'
        else:
            quoted = False
        if not quoted:
            raise MetricsParseError(f"line {lineno}: expected =\"value\" after label {key!r}")
        pos += 1
        value = []
        while True:
            if pos >= len(line):
                raise MetricsParseError(f"line {lineno}: unterminated value of label {key!r}")
            ch = line[pos]
            if ch == "\\" and pos + 1 < len(line):
                value.append(_ESCAPES.get(line[pos + 1], "\\" + line[pos + 1]))
                pos += 2
            elif ch == '"':
                pos += 1
                break
            else:
                value.append(ch)
                pos += 1
        labels[key] = "".join(value)
        while pos < len(line) and line[pos] in " \t":
            pos += 1
        if pos < len(line) and line[pos] == ",":
            pos += 1
        elif pos < len(line) and line[pos] != "}":
            raise MetricsParseError(f"line {lineno}: expected , or }} after label {key!r}")


def parse_exposition(text: str) -> Scrape:
    """Samples of a Prometheus text exposition (version 0.0.4; OpenMetrics' `# EOF` and exemplars
    are tolerated). Comments and HELP/TYPE lines are skipped."""
    samples: list[Sample] = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if len(samples) >= MAX_SAMPLES:
            raise MetricsParseError(f"more than {MAX_SAMPLES} samples")
        m = _NAME.match(line)
        if not m:
            raise MetricsParseError(f"line {lineno}: expected a metric name: {line[:80]!r}")
        name, pos = m.group(), m.end()
        labels: Labels = ()
        brace = len(line[pos:]) - len(line[pos:].lstrip(" \t")) + pos
        if brace < len(line) and line[brace] == "{":
            pos = brace
            labels, pos = _parse_labels(line, pos, lineno)
        rest = line[pos:].split("#", 1)[0].split()  # drop an exemplar
        if not rest or len(rest) > 2:
            raise MetricsParseError(f"line {lineno}: expected a value (and an optional timestamp)")
        try:
            value = float(rest[0])
        except ValueError:
            raise MetricsParseError(f"line {lineno}: {rest[0]!r} is not a number") from None
        samples.append(Sample(name, labels, value))
    return Scrape(tuple(samples))


@dataclass(frozen=True)
class Scrape:
    """One scrape's samples, with lookups by name and label selector."""

    samples: tuple[Sample, ...]

    def select(self, name: str, selector: Mapping[str, str] | None = None) -> list[Sample]:
        selector = selector or {}
        return [s for s in self.samples if s.name == name and s.matches(selector)]

    def total(self, name: str, selector: Mapping[str, str] | None = None) -> float | None:
        """Sum over the matching series; None when there are none."""
        found = self.select(name, selector)
        return sum(s.value for s in found) if found else None

    def series(self, name: str, selector: Mapping[str, str] | None = None) -> dict[Labels, float]:
        return {s.labels: s.value for s in self.select(name, selector)}

    def buckets(self, histogram: str, selector: Mapping[str, str] | None = None) -> list[tuple[float, float]]:
        """(upper bound, cumulative count) of a histogram, summed over matching series."""
        return _group_buckets(self.series(f"{histogram}_bucket", selector))


def _group_buckets(series: Mapping[Labels, float]) -> list[tuple[float, float]]:
    by_le: dict[float, float] = {}
    for labels, value in series.items():
        le = dict(labels).get("le")
        if le is None:
            continue
        try:
            bound = float(le)
        except ValueError:
            continue
        by_le[bound] = by_le.get(bound, 0.0) + value
    out, running = [], 0.0
    for bound in sorted(by_le):
        running = max(running, by_le[bound])  # cumulative counts never go down
        out.append((bound, running))
    return out


def quantile_from_buckets(q: float, buckets: Sequence[tuple[float, float]]) -> float | None:
    """histogram_quantile(q) over cumulative buckets [(le, count)] sorted by le, +Inf last.
    None without observations. The first bucket's lower bound is 0 (latencies are not negative)."""
    if not 0 <= q <= 1:
        raise ValueError(f"quantile {q} is not within [0, 1]")
    if not buckets or buckets[-1][1] <= 0:
        return None
    total = buckets[-1][1]
    rank = q * total
    prev_bound, prev_count = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank and count > prev_count:
            if math.isinf(bound):
                finite = [b for b, _ in buckets if not math.isinf(b)]
                return finite[-1] if finite else None
            if bound <= 0:
                return bound
            return prev_bound + (bound - prev_bound) * (rank - prev_count) / (count - prev_count)
        prev_bound, prev_count = bound, count
    return prev_bound


def _delta(before: Mapping[Labels, float], after: Mapping[Labels, float]) -> tuple[dict[Labels, float], bool]:
    """Per-series increase; a series that went down restarted from zero."""
    out, reset = {}, False
    for labels, value in after.items():
        old = before.get(labels, 0.0)
        if value < old:
            out[labels], reset = value, True
        else:
            out[labels] = value - old
    return out, reset


@dataclass(frozen=True)
class WindowStats:
    """What a server did between two scrapes."""

    requests: int  # generation requests (HTTP counter), or successes when it is missing
    errors: int | None  # 5xx answers; None when the HTTP counter is missing
    client_errors: int | None  # 4xx answers
    successes: int  # vllm:request_success_total increase
    error_rate: float | None  # errors / requests; None without requests or without the HTTP counter
    latency_count: int  # observations in the latency histogram
    p95_latency_s: float | None  # None without observations
    reset: bool  # a counter went down: the server restarted in between
    latency_buckets: tuple[tuple[float, float], ...] = ()  # (le, cumulative count) of the window

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def window_stats(before: Scrape, after: Scrape, *, model: str | None = None, quantile: float = 0.95,
                 handlers: Iterable[str] = GENERATION_HANDLERS) -> WindowStats:
    """Requests, errors, error rate and the latency quantile between two scrapes of one server.
    `model` restricts vLLM's own metrics to one `model_name` (the HTTP counter has no model label)."""
    selector = {"model_name": model} if model else {}
    handlers = set(handlers)

    def http(scrape: Scrape) -> dict[Labels, float]:
        return {s.labels: s.value for s in scrape.select(HTTP_REQUESTS) if s.label("handler") in handlers}

    http_delta, reset_http = _delta(http(before), http(after))
    success_delta, reset_success = _delta(before.series(REQUEST_SUCCESS, selector),
                                          after.series(REQUEST_SUCCESS, selector))
    bucket_delta, reset_buckets = _delta(before.series(f"{E2E_LATENCY}_bucket", selector),
                                         after.series(f"{E2E_LATENCY}_bucket", selector))
    successes = round(sum(success_delta.values()))
    buckets = _group_buckets(bucket_delta)
    has_http = bool(http(after))
    if has_http:
        by_class: dict[str, float] = {}
        for labels, value in http_delta.items():
            status = dict(labels).get("status", "")
            by_class[status[:1]] = by_class.get(status[:1], 0.0) + value
        requests = round(sum(by_class.values()))
        server_errors = round(by_class.get("5", 0.0))
        errors: int | None = server_errors
        client_errors: int | None = round(by_class.get("4", 0.0))
        error_rate = server_errors / requests if requests else None
    else:
        requests, errors, client_errors, error_rate = successes, None, None, None
    return WindowStats(
        requests=requests, errors=errors, client_errors=client_errors, successes=successes,
        error_rate=error_rate, latency_count=round(buckets[-1][1]) if buckets else 0,
        p95_latency_s=quantile_from_buckets(quantile, buckets) if buckets else None,
        reset=reset_http or reset_success or reset_buckets, latency_buckets=tuple(buckets),
    )


def merge_buckets(*histograms: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """Several servers' cumulative buckets [(le, count)] as one histogram (what PromQL's
    histogram_quantile over a sum by (le) sees)."""
    by_le: dict[float, float] = {}
    for buckets in histograms:
        for le, count in buckets:
            by_le[le] = by_le.get(le, 0.0) + count
    out, running = [], 0.0
    for le in sorted(by_le):
        running = max(running, by_le[le])
        out.append((le, running))
    return out


def metrics_url(url: str) -> str:
    """`http://10.0.0.5:8000` -> `http://10.0.0.5:8000/metrics`; a URL with a path is kept."""
    parts = urlsplit(url)
    return url.rstrip("/") + "/metrics" if parts.path in ("", "/") else url


class _TooLarge(Exception):
    pass


async def scrape(url: str, *, timeout: float = 5.0, session: aiohttp.ClientSession | None = None,
                 max_bytes: int = MAX_SCRAPE_BYTES) -> Scrape:
    """GET a server's /metrics (a base URL gets `/metrics`), at most `max_bytes` of it, and parse
    it. Raises ScrapeError."""
    target = metrics_url(url)

    async def get(s: aiohttp.ClientSession) -> tuple[int, str]:
        async with s.get(target, timeout=aiohttp.ClientTimeout(total=timeout),
                         headers={"Accept": "text/plain;version=0.0.4"}) as resp:
            if resp.status != 200:
                return resp.status, ""  # the body is not read
            if resp.content_length is not None and resp.content_length > max_bytes:
                raise _TooLarge()
            body = bytearray()
            while len(body) <= max_bytes:  # in chunks, up to one byte past the limit, whatever the headers say
                chunk = await resp.content.read(min(64 * 1024, max_bytes + 1 - len(body)))
                if not chunk:
                    return resp.status, body.decode("utf-8", "replace")  # the exposition format is UTF-8
                body += chunk
            raise _TooLarge()

    try:
        if session is not None:
            status, text = await get(session)
        else:
            async with aiohttp.ClientSession(trust_env=False) as own:
                status, text = await get(own)
    except _TooLarge:
        raise ScrapeError(f"{target}: the page is larger than {max_bytes} bytes") from None
    except TimeoutError:
        raise ScrapeError(f"{target}: no answer within {timeout:g} s") from None
    except aiohttp.ClientError as exc:
        raise ScrapeError(f"{target}: {type(exc).__name__}: {str(exc)[:200]}") from None
    if status != 200:
        raise ScrapeError(f"{target}: HTTP {status}")
    try:
        return parse_exposition(text)
    except MetricsParseError as exc:
        raise ScrapeError(f"{target}: {exc}") from None
