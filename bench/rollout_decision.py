"""Monte-Carlo benchmark of the rollout's promote/rollback rule (`slmfleet.evaluation.stats`).

Simulates evaluations of a candidate against the stable on a task where the stable scores 0.85
(exact match, 0/1 per case) and runs the operator's own decision code on them look by look, with
the defaults (DEFAULT_SAMPLE_SIZE cases in DEFAULT_LOOKS looks, DEFAULT_MARGIN, DEFAULT_ALPHA):

- false_promotion_rate: the candidate is truly 5 points worse (0.80 vs 0.85); how often it passes.
  Target: <= alpha.
- power: the candidate is as good as the stable (0.85 vs 0.85); how often it passes. Target: >= 0.8.
- mean_cases_used: cases evaluated before the verdict, for both (what early stopping saved).

Pairing model (the correlation assumption): both revisions answer the same cases. For each case,
with probability RHO the two outcomes are coupled (one uniform draw decides both, so they agree
unless the case falls between the two accuracies), otherwise they are independent. The marginal
accuracies are exactly the stated ones; at equal accuracy p the revisions disagree on
(1 - RHO) * 2p(1 - p) of the cases (7.65% at RHO = 0.7, p = 0.85) and RHO is the correlation of the
two outcomes. Power depends on that disagreement, so `sensitivity` repeats both scenarios for
RHO from 0.5 to 0.9, and `validation` checks the test's level where it is hardest: a candidate
exactly at the margin (the boundary of H0), a small evaluation (60 cases), and fractional scores
(0, 0.5, 1: the empirical-likelihood path).

Each scenario has its own seeded generator (seed derived from SEED and the scenario's name), so
the numbers are the same on every run and with any number of workers. Runs the scenarios on two
processes. Writes bench/results/rollout_decision.json. Run: `.venv/bin/python -m bench.rollout_decision`.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import random
import sys
import time
from bisect import bisect
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from slmfleet.evaluation.stats import (
    DEFAULT_ALPHA,
    DEFAULT_FUTILITY_CONDITIONAL_POWER,
    DEFAULT_LOOKS,
    DEFAULT_MARGIN,
    DEFAULT_SAMPLE_SIZE,
    METHOD,
    PairedSummary,
    decide_summary,
    look_plan,
)

RESULTS = Path(__file__).resolve().parent / "results" / "rollout_decision.json"
SIMULATIONS = 20_000
SENSITIVITY_SIMULATIONS = 5_000
VALIDATION_SIMULATIONS = 5_000
SEED = 20_251_121
RHO = 0.7
STABLE = 0.85
WORSE = 0.80


def cell_probabilities(stable: float, candidate: float, rho: float) -> tuple[float, float, float, float]:
    """P(both right), P(stable only), P(candidate only), P(neither) under the pairing model."""
    both = rho * min(stable, candidate) + (1 - rho) * stable * candidate
    stable_only = rho * max(0.0, stable - candidate) + (1 - rho) * stable * (1 - candidate)
    candidate_only = rho * max(0.0, candidate - stable) + (1 - rho) * (1 - stable) * candidate
    return both, stable_only, candidate_only, 1.0 - both - stable_only - candidate_only


def discordant_share(stable: float, candidate: float, rho: float) -> float:
    _, s, c, _ = cell_probabilities(stable, candidate, rho)
    return s + c


def _seed(name: str) -> int:
    return int.from_bytes(hashlib.sha256(f"{SEED}:{name}".encode()).digest()[:8], "big")


CHUNK = 2_500  # simulations per task: many small tasks keep both workers busy to the end


def simulate_chunk(name: str, chunk: int, stable: float, candidate: float, rho: float, simulations: int,
                   planned_n: int = DEFAULT_SAMPLE_SIZE, fractional: bool = False) -> dict:
    """`simulations` evaluations through the decision rule: passes, cases used, where and why they stopped."""
    both, stable_only, candidate_only, _ = cell_probabilities(stable, candidate, rho)
    t_both, t_stable, t_candidate = both, both + stable_only, both + stable_only + candidate_only
    plan = look_plan(planned_n, DEFAULT_LOOKS, DEFAULT_ALPHA)
    rng = random.Random(_seed(f"{name}:{chunk}"))
    passes = cases = 0
    stopped_at = [0] * len(plan.sizes)
    reasons: dict[str, int] = {}
    for _ in range(simulations):
        summary = PairedSummary()
        previous = 0
        decision = None
        for size in plan.sizes:
            batch = size - previous
            previous = size
            if fractional:
                summary = summary + _fractional_batch(rng, batch, t_both, t_stable, t_candidate)
            else:
                draws = sorted([rng.random() for _ in range(batch)])
                n_both = bisect(draws, t_both)
                n_stable = bisect(draws, t_stable) - n_both
                n_candidate = bisect(draws, t_candidate) - n_both - n_stable
                summary = summary + PairedSummary.binary(
                    both=n_both, stable_only=n_stable, candidate_only=n_candidate,
                    neither=batch - n_both - n_stable - n_candidate)
            decision = decide_summary(summary, margin=DEFAULT_MARGIN, alpha=DEFAULT_ALPHA, planned_n=planned_n,
                                      looks=DEFAULT_LOOKS,
                                      futility_conditional_power=DEFAULT_FUTILITY_CONDITIONAL_POWER)
            if decision.verdict != "continue":
                break
        assert decision is not None and decision.verdict != "continue"
        passes += decision.verdict == "pass"
        cases += summary.n
        stopped_at[decision.look - 1] += 1
        kind = decision.reason.split(":", 1)[0]
        reasons[kind] = reasons.get(kind, 0) + 1
    return {"name": name, "simulations": simulations, "passes": passes, "cases": cases,
            "stopped_at": stopped_at, "reasons": reasons}


def summarize(name: str, chunks: list[dict], stable: float, candidate: float, rho: float,
              planned_n: int) -> dict:
    simulations = sum(c["simulations"] for c in chunks)
    rate = sum(c["passes"] for c in chunks) / simulations
    reasons: dict[str, int] = {}
    for c in chunks:
        for k, v in c["reasons"].items():
            reasons[k] = reasons.get(k, 0) + v
    return {
        "name": name,
        "stable_accuracy": stable,
        "candidate_accuracy": candidate,
        "rho": rho,
        "discordant_share": round(discordant_share(stable, candidate, rho), 5),
        "planned_n": planned_n,
        "simulations": simulations,
        "pass_rate": round(rate, 5),
        "standard_error": round(math.sqrt(rate * (1 - rate) / simulations), 5),
        "mean_cases_used": round(sum(c["cases"] for c in chunks) / simulations, 1),
        "stopped_at_look": [sum(col) for col in zip(*(c["stopped_at"] for c in chunks), strict=True)],
        "verdict_reasons": dict(sorted(reasons.items())),
    }


def _fractional_batch(rng: random.Random, batch: int, t_both: float, t_stable: float,
                      t_candidate: float) -> PairedSummary:
    """Scores in {0, 0.5, 1}: each case has two sub-items drawn from the same pairing model."""
    stable_scores, candidate_scores = [], []
    for _ in range(batch):
        s = c = 0.0
        for _ in range(2):
            u = rng.random()
            s += 0.5 if u < t_stable else 0.0
            c += 0.5 if u < t_both or t_stable <= u < t_candidate else 0.0
        stable_scores.append(s)
        candidate_scores.append(c)
    return PairedSummary.of(stable_scores, candidate_scores)


def _run(task: tuple) -> dict:
    name, chunk, args, kwargs = task
    return simulate_chunk(name, chunk, *args, **kwargs)


def main() -> int:
    started = time.perf_counter()
    margin = DEFAULT_MARGIN
    at_margin = round(STABLE - margin, 6)
    scenarios = [  # name, (stable, candidate, rho, simulations), options
        ("false_promotion", (STABLE, WORSE, RHO, SIMULATIONS), {}),
        ("power", (STABLE, STABLE, RHO, SIMULATIONS), {}),
        ("at_margin", (STABLE, at_margin, RHO, SIMULATIONS), {}),
        ("at_margin_60_cases", (STABLE, at_margin, RHO, VALIDATION_SIMULATIONS), {"planned_n": 60}),
        ("at_margin_fractional_scores", (STABLE, at_margin, RHO, VALIDATION_SIMULATIONS // 2), {"fractional": True}),
    ]
    for rho in (0.5, 0.6, 0.8, 0.9):
        scenarios.append((f"false_promotion_rho_{rho}", (STABLE, WORSE, rho, SENSITIVITY_SIMULATIONS), {}))
        scenarios.append((f"power_rho_{rho}", (STABLE, STABLE, rho, SENSITIVITY_SIMULATIONS), {}))
        scenarios.append((f"at_margin_rho_{rho}", (STABLE, at_margin, rho, SENSITIVITY_SIMULATIONS), {}))
    tasks = []
    for name, (stable, candidate, rho, simulations), options in scenarios:
        for chunk in range(math.ceil(simulations / CHUNK)):
            size = min(CHUNK, simulations - chunk * CHUNK)
            tasks.append((name, chunk, (stable, candidate, rho, size), options))
    tasks.sort(key=lambda t: -(3 if t[3].get("fractional") else 1))  # the slowest first
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        done = list(pool.map(_run, tasks))
    runs = {}
    for name, (stable, candidate, rho, _), options in scenarios:
        chunks = [d for d in done if d["name"] == name]
        runs[name] = summarize(name, chunks, stable, candidate, rho, options.get("planned_n", DEFAULT_SAMPLE_SIZE))

    plan = look_plan(DEFAULT_SAMPLE_SIZE, DEFAULT_LOOKS, DEFAULT_ALPHA)
    fp, power = runs["false_promotion"], runs["power"]
    sensitivity = []
    for rho in (0.5, 0.6, RHO, 0.8, 0.9):
        suffix = "" if rho == RHO else f"_rho_{rho}"
        sensitivity.append({
            "rho": rho,
            "discordant_share_when_equal": round(discordant_share(STABLE, STABLE, rho), 5),
            "false_promotion_rate": runs["false_promotion" + suffix]["pass_rate"],
            "power": runs["power" + suffix]["pass_rate"],
            "type1_at_margin": runs["at_margin" + suffix]["pass_rate"],
            "mean_cases_used_equal": runs["power" + suffix]["mean_cases_used"],
            "mean_cases_used_worse": runs["false_promotion" + suffix]["mean_cases_used"],
            "simulations": runs["power" + suffix]["simulations"],
        })
    result = {
        "benchmark": "rollout_decision",
        "what": "Monte-Carlo of the paired group-sequential non-inferiority rule with the operator's defaults: "
                "how often a 5-points-worse candidate is promoted, how often an equal one is, and how many "
                "cases early stopping uses",
        "method": METHOD,
        "alpha": DEFAULT_ALPHA,
        "margin": DEFAULT_MARGIN,
        "n": DEFAULT_SAMPLE_SIZE,
        "looks": len(plan.sizes),
        "look_sizes": list(plan.sizes),
        "efficacy_critical_values": [round(c, 4) for c in plan.efficacy],
        "futility": f"conditional power under 'candidate as good as stable' < {DEFAULT_FUTILITY_CONDITIONAL_POWER} "
                    "at an interim look (non-binding)",
        "simulations": SIMULATIONS,
        "seed": SEED,
        "correlation": {
            "model": "per case, with probability rho both revisions' outcomes come from one uniform draw "
                     "(they agree unless the case lies between the two accuracies), otherwise independent; "
                     "marginal accuracies exact",
            "rho": RHO,
            "discordant_share_when_equal": round(discordant_share(STABLE, STABLE, RHO), 5),
            "discordant_share_when_5_points_worse": round(discordant_share(STABLE, WORSE, RHO), 5),
        },
        "scenarios": {
            "false_promotion": f"stable {STABLE}, candidate {WORSE} (5 points worse)",
            "power": f"stable {STABLE}, candidate {STABLE} (equal)",
        },
        "false_promotion_rate": fp["pass_rate"],
        "false_promotion_rate_standard_error": fp["standard_error"],
        "power": power["pass_rate"],
        "power_standard_error": power["standard_error"],
        "mean_cases_used": {
            "false_promotion_scenario": fp["mean_cases_used"],
            "power_scenario": power["mean_cases_used"],
        },
        "share_of_planned_cases_used": {
            "false_promotion_scenario": round(fp["mean_cases_used"] / DEFAULT_SAMPLE_SIZE, 3),
            "power_scenario": round(power["mean_cases_used"] / DEFAULT_SAMPLE_SIZE, 3),
        },
        "targets": {
            "false_promotion_rate_at_most_alpha": fp["pass_rate"] <= DEFAULT_ALPHA,
            "power_at_least_0_8": power["pass_rate"] >= 0.8,
        },
        "validation": {
            "type1_at_margin": runs["at_margin"]["pass_rate"],
            "type1_at_margin_standard_error": runs["at_margin"]["standard_error"],
            "type1_at_margin_60_cases": runs["at_margin_60_cases"]["pass_rate"],
            "type1_at_margin_fractional_scores": runs["at_margin_fractional_scores"]["pass_rate"],
            "note": "the candidate exactly at the margin (the boundary of H0) is the hardest case for the "
                    "level; a valid test promotes it at most alpha of the time up to Monte-Carlo error",
        },
        "sensitivity": sensitivity,
        "runs": [runs[name] for name in sorted(runs)],
        "seconds": round(time.perf_counter() - started, 1),
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    print(f"alpha {DEFAULT_ALPHA}  margin {DEFAULT_MARGIN}  n {DEFAULT_SAMPLE_SIZE} in {len(plan.sizes)} looks  "
          f"rho {RHO}  {SIMULATIONS} simulations")
    print(f"false promotion (0.80 vs 0.85): {fp['pass_rate']:.4f} (target <= {DEFAULT_ALPHA}), "
          f"mean cases {fp['mean_cases_used']}")
    print(f"power (0.85 vs 0.85):           {power['pass_rate']:.4f} (target >= 0.8), "
          f"mean cases {power['mean_cases_used']}")
    print(f"type-I at the margin:           {runs['at_margin']['pass_rate']:.4f}")
    for row in sensitivity:
        print(f"  rho {row['rho']}: power {row['power']:.3f}  false promotion {row['false_promotion_rate']:.4f}  "
              f"type-I at margin {row['type1_at_margin']:.4f}")
    print(f"{result['seconds']} s -> {RESULTS}")
    return 0 if all(result["targets"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
