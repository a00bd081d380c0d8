"""`slmfleet eval`: score a model, or a candidate against a stable, on a set of cases.

Sends every case (JSONL: {"messages": [...] | "prompt": "...", "expected": ...}, see
slmfleet.evaluation.dataset) to the endpoint(s) with temperature 0, scores the answers and prints
the mean score per scorer, the difference candidate - stable (paired: the same cases to both), the
p95 latency and the error rate of each side. The first --scorer decides the score; the others are
reported. `--json` prints one JSON object with every case's answers.

Scorers: exact_match, contains, regex, json_schema, json_field, with options after a colon:
  --scorer exact_match:lowercase=true,strip_punctuation=true,remove_articles=true
  --scorer 'regex:pattern=^\\d{1,3}$,mode=full'    --scorer json_field:field=label
  --scorer json_schema:schema=@schema.json         --scorer '{"type": "contains", "require": "all"}'
A dataset in S3 (--dataset s3://bucket/cases.jsonl) is read with the AWS_* environment settings.
Exit status: 0 evaluated, 1 an endpoint answered nothing (or could not name its model), 2 bad input.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from typing import Any
from urllib.parse import urlsplit

from slmfleet.cli.argtypes import positive_float, positive_int
from slmfleet.evaluation.dataset import DatasetError, load_file, load_s3_jsonl, sample
from slmfleet.evaluation.runner import (
    DEFAULT_CONCURRENCY,
    DEFAULT_MAX_TOKENS,
    DEFAULT_TIMEOUT,
    MAX_TOKENS_LIMIT,
    Endpoint,
    EndpointError,
    EvalRun,
    PairedRun,
    SideSummary,
    evaluate,
    evaluate_paired,
    list_models,
)
from slmfleet.evaluation.scorers import Scorer, ScorerError, build_scorers

EXIT_OK, EXIT_NO_ANSWERS, EXIT_BAD_INPUT = 0, 1, 2


class BadInput(Exception):
    pass


def _max_tokens(text: str) -> int:
    value = positive_int(text)
    if value > MAX_TOKENS_LIMIT:
        raise argparse.ArgumentTypeError(f"at most {MAX_TOKENS_LIMIT}")
    return value


def _url(text: str) -> str:
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise argparse.ArgumentTypeError(f"{text!r} is not an http(s):// URL")
    return text


def add_parser(sub: argparse._SubParsersAction) -> None:
    doc = __doc__.split("\n\n")
    p = sub.add_parser("eval", help="score a model, or a candidate against a stable, on a set of cases",
                       description=doc[0] + "\n\n" + doc[1], epilog=doc[2],
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dataset", required=True, metavar="FILE|s3://bucket/key",
                   help="cases as JSONL (or a JSON array in a .json file)")
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--endpoint", type=_url, metavar="URL", help="evaluate one server")
    where.add_argument("--stable", type=_url, metavar="URL", help="the stable revision's server (with --candidate)")
    p.add_argument("--candidate", type=_url, metavar="URL", help="the candidate revision's server (with --stable)")
    p.add_argument("--model", help="model name to request (default: the first model each server lists)")
    p.add_argument("--stable-model", help="model name for the stable only")
    p.add_argument("--candidate-model", help="model name for the candidate only")
    p.add_argument("--scorer", action="append", default=[], metavar="SPEC",
                   help="type[:key=value,...] or a JSON object (repeatable; default exact_match)")
    p.add_argument("--sample", type=positive_int, metavar="N", help="evaluate N cases sampled deterministically")
    p.add_argument("--seed", default="0", help="sampling seed (default 0)")
    p.add_argument("--concurrency", type=positive_int, default=DEFAULT_CONCURRENCY,
                   help=f"requests in flight per server (default {DEFAULT_CONCURRENCY})")
    p.add_argument("--timeout", type=positive_float, default=DEFAULT_TIMEOUT,
                   help=f"seconds per request (default {DEFAULT_TIMEOUT:g})")
    p.add_argument("--max-tokens", type=_max_tokens, default=DEFAULT_MAX_TOKENS,
                   help=f"max_tokens per request (default {DEFAULT_MAX_TOKENS}, at most {MAX_TOKENS_LIMIT})")
    p.add_argument("--s3-endpoint-url", help="S3 endpoint for an s3:// dataset (AWS_ENDPOINT_URL)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.set_defaults(func=run, _parser=p)


def run(args: argparse.Namespace) -> int:
    if args.stable and not args.candidate:
        args._parser.error("--stable needs --candidate")
    if args.candidate and not args.stable:
        args._parser.error("--candidate needs --stable")
    try:
        scorers = build_scorers(args.scorer or ["exact_match"])
        cases = _load(args.dataset, args.s3_endpoint_url, scorers)
    except (ScorerError, DatasetError, BadInput) as exc:
        print(f"slmfleet eval: error: {exc}", file=sys.stderr)
        return EXIT_BAD_INPUT
    chosen = sample(cases, args.sample, args.seed)
    try:
        result, endpoints = asyncio.run(_evaluate(args, chosen, scorers))
    except EndpointError as exc:
        print(f"slmfleet eval: error: {exc}", file=sys.stderr)
        return EXIT_NO_ANSWERS
    header = {"dataset": args.dataset, "cases_total": len(cases), "n": result.n, "seed": args.seed,
              "scorers": [s.spec for s in scorers]}
    if args.json:
        doc = {**header, **_json(result, endpoints)}
        print(json.dumps(doc, indent=2, sort_keys=True))
    else:
        print(render(result, endpoints, header, scorers))
    sides = [result.stable, result.candidate] if isinstance(result, PairedRun) else [result.summary]
    return EXIT_NO_ANSWERS if any(s.n and s.errors == s.n for s in sides) else EXIT_OK


def _load(dataset: str, s3_endpoint_url: str | None, scorers: tuple[Scorer, ...]) -> list:
    if dataset.startswith("s3://"):
        # Imported only when needed: it loads boto3.
        from slmfleet.weights.s3 import client_from_env

        try:
            client = client_from_env({"endpoint_url": s3_endpoint_url})
        except ValueError as exc:
            raise BadInput(str(exc)) from exc
        return load_s3_jsonl(client, dataset, default_scorers=scorers)
    return load_file(dataset, default_scorers=scorers)


async def _model(url: str, *names: str | None) -> str:
    for name in names:
        if name:
            return name
    models = await list_models(url)
    if not models:
        raise EndpointError(f"{url} serves no model")
    return models[0]


async def _evaluate(args: argparse.Namespace, cases: list, scorers: tuple[Scorer, ...]
                    ) -> tuple[PairedRun | EvalRun, dict[str, Endpoint]]:
    # The answers are shown (--json), so this run keeps their texts; each is read with a byte cap.
    settings = {"concurrency": args.concurrency, "timeout": args.timeout, "max_tokens": args.max_tokens,
                "keep_text": True}
    if args.endpoint:
        endpoint = Endpoint(args.endpoint, await _model(args.endpoint, args.model))
        return await evaluate(cases, endpoint, scorers, **settings), {"endpoint": endpoint}
    stable = Endpoint(args.stable, await _model(args.stable, args.stable_model, args.model))
    candidate = Endpoint(args.candidate, await _model(args.candidate, args.candidate_model, args.model))
    run = await evaluate_paired(cases, stable, candidate, scorers, **settings)
    return run, {"stable": stable, "candidate": candidate}


def _json(result: PairedRun | EvalRun, endpoints: dict[str, Endpoint]) -> dict[str, Any]:
    doc = result.to_dict(cases=True)
    if isinstance(result, PairedRun):
        for side in ("stable", "candidate"):
            doc[side] = {"url": endpoints[side].base_url, "model": endpoints[side].model, **doc[side]}
    else:
        doc["endpoint"] = {"url": endpoints["endpoint"].base_url, "model": endpoints["endpoint"].model,
                           **doc.pop("summary")}
    return doc


def _num(value: float | None, fmt: str = "{:.3f}") -> str:
    return "-" if value is None else fmt.format(value)


def _signed(value: float | None) -> str:
    return "-" if value is None else f"{value:+.3f}"


def render(result: PairedRun | EvalRun, endpoints: dict[str, Endpoint], header: dict[str, Any],
           scorers: tuple[Scorer, ...]) -> str:
    if isinstance(result, PairedRun):
        names, sides = ["stable", "candidate"], [result.stable, result.candidate]
    else:
        names, sides = ["endpoint"], [result.summary]
    seed = f" (sampled, seed {header['seed']})" if result.planned < header["cases_total"] else ""
    lines = [f"dataset {header['dataset']}: {result.n} of {header['cases_total']} cases{seed}"]
    for name in names:
        lines.append(f"{name + ':':<11}{endpoints[name].base_url}  model {endpoints[name].model}")
    rows: list[list[str]] = [["", *names, *(["difference"] if len(sides) == 2 else [])]]

    def row(label: str, values: list[str], diff: str | None = None) -> None:
        rows.append([label, *values, *([diff or ""] if len(sides) == 2 else [])])

    scorer_names = [s.name for s in scorers]
    for side in sides:  # per-case scorer overrides may add names
        scorer_names += [n for n in side.scores if n not in scorer_names]

    def diff(get: Any) -> str | None:
        if len(sides) != 2 or get(sides[0]) is None or get(sides[1]) is None:
            return None
        return _signed(get(sides[1]) - get(sides[0]))

    row(f"score ({scorers[0].name})", [_num(s.score) for s in sides], diff(lambda s: s.score))
    for name in scorer_names:
        row(f"  {name}", [_num(s.scores.get(name)) for s in sides], diff(lambda s, n=name: s.scores.get(n)))
    row("p95 latency", [_num(s.p95_latency_s, "{:.3f} s") for s in sides])
    row("mean latency", [_num(s.mean_latency_s, "{:.3f} s") for s in sides])
    row("error rate", [_error_rate(s) for s in sides])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines.append("")
    for r in rows:
        lines.append("  ".join(cell.ljust(w) for cell, w in zip(r, widths, strict=True)).rstrip())
    return "\n".join(lines)


def _error_rate(s: SideSummary) -> str:
    if s.error_rate is None:
        return "-"
    kinds = ", ".join(f"{k} {v}" for k, v in sorted(s.errors_by_kind.items()))
    return f"{s.error_rate:.1%} ({s.errors}/{s.n}{f': {kinds}' if kinds else ''})"
