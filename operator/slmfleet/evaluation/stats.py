"""Promote or roll back: a paired, group-sequential non-inferiority test of candidate vs stable.

Pure: standard library only (math, statistics), no I/O, no clock. Deterministic: the same scores
give the same verdict, always.

## The question
Stable and candidate answer the *same* cases; each case gives a score in [0, 1] per revision
(0/1 for exact match). With d_i = c_i - s_i the per-case difference and mu its mean, an evaluation
tests non-inferiority at margin delta:

    H0: mu <= -delta  (the candidate is worse by more than the margin)   vs   H1: mu > -delta

and promotes only when H0 is rejected. A false promotion (a type-I error) is what must stay <= alpha.

## The statistic: a paired score test
Paired differences, not two independent means: both revisions see the same cases, so the large
case-to-case variation in difficulty cancels out of d_i and only the cases where the two revisions
disagree carry information.

For 0/1 scores the test is Tango's score test for the difference of paired proportions (Tango 1998,
"Equivalence test and confidence interval for the difference in proportions for the paired-sample
design", Stat. Med. 17:891): the variance in the statistic is the one of the maximum-likelihood
distribution *under the hypothesis tested* (restricted MLE), not the observed one,

    Z(mu0) = (dbar - mu0) / sqrt(V0(mu0) / N),   V0(mu0) = P0(d=-1) + P0(d=+1) - mu0^2,

which keeps its level where the plain Wald statistic does not: d_i is skewed whenever the two
revisions differ (more -1 than +1 under H0), and a Wald bound then promotes too often (0.050-0.060
at alpha = 0.05 for a candidate exactly at the margin in our simulations; this test 0.041-0.051).
For scores in (0, 1) the same statistic comes from empirical likelihood: the restricted
distribution is the one nearest the data (by likelihood) on the observed values with mean mu0
(Owen 2001, Empirical Likelihood); on 0/1 data the two coincide. Before computing, one
pseudo-pair with d = +1 and one with d = -1 are added (as in Bonett & Price 2012's adjusted
interval for paired proportions): a floor on the variance, so that e.g. 60 cases without a single
disagreement are not taken as proof of anything, and the empirical likelihood is defined for every
mu0 in (-1, 1). N = n + 2 and dbar = sum(d_i) / N;
`difference` in results is the plain sum(d_i) / n.

The bounds are the test inverted: ci_low / ci_high are the mu0 where Z(mu0) = +c / -c, so
"lower bound > -delta" and "Z(-delta) > c" are the same statement.

## Sequential looks and alpha spending
Cases are scored in batches; after each of the `looks` (`look_sizes`) the rule decides PASS, FAIL or
CONTINUE, so a clear verdict does not wait for all cases. Looking several times at a growing sample
would inflate the false-promotion rate if every look used the one-look bar, so the per-look
critical values come from the Lan-DeMets spending function of O'Brien-Fleming type,
alpha(t) = 2 - 2 Phi(z_{1-alpha/2} / sqrt(t)) at information fraction t = n_k / n_K: almost nothing
is spent at the first looks (high bars), and the last look is close to the one-look bar. The
critical values are exact for the joint normal distribution of the look statistics
(Cov(Z_j, Z_k) = sqrt(t_j / t_k)), by recursive numerical integration (Armitage, McPherson & Rowe
1969); e.g. alpha = 0.05, 5 equal looks: 4.229, 2.888, 2.298, 1.962, 1.740. The bounds at c_k are
repeated confidence bounds (Jennison & Turnbull 2000, ch. 9): each holds with probability >= 1 - alpha
across all looks together (to the normal approximation the critical values rest on).

At look k (k = 1..K), in this order:
- FAIL, inferior:    upper bound < -delta (the candidate is worse than the margin, with confidence).
- FAIL, below floor: the candidate's own upper bound < minimum score (when a minimum is set).
- FAIL, futility (interim looks only): conditional power < `futility_conditional_power` (0.10):
  even if the candidate were truly as good as the stable, the chance that this evaluation would
  still pass at its final look, given the data so far, is below 10% (stochastic curtailment, Lan,
  Simon & Halperin 1982; Brownian-motion approximation B(t) = Z_k(-delta) sqrt(t) with drift
  theta = delta / sqrt(V0(0) / N_K), later interim looks ignored, which makes it stop a little
  more, never less). Non-binding: the efficacy values ignore it, so it can only lower the
  false-promotion rate. It stops a worse candidate early (~half of the cases saved) and an equal
  one rarely, the less the more cases are planned (a bar on Z(0) from a beta-spending function
  would stop an equal candidate ~7% of the time however large the evaluation).
- PASS: lower bound > -delta, and the candidate's mean >= minimum score (when set).
- otherwise the final look FAILs ("not shown non-inferior") and an interim look CONTINUEs.

## The minimum score
`minimum_score` is an absolute floor for the candidate's mean score, judged by the point estimate
(the threshold is about the score the team sees, as in any acceptance test): a PASS needs the
candidate's mean >= the floor, and the final look FAILs below it. An interim look FAILs early only
when even the candidate's upper bound is below the floor: the Wilson score bound at the look's c_k,
valid for any [0, 1] scores because their variance is at most p(1 - p).

## Latency and errors
p95 latency and error rate are point estimates compared with the thresholds (`check_operational`);
the evaluation layer measures them (`evaluation.runner` from an evaluation's own requests,
`evaluation.metrics` from the servers' Prometheus histograms for live traffic).

## The defaults (bench/rollout_decision.py measures them; results in bench/results/)
- alpha = 0.05 (evaluation.confidence 0.95).
- margin = 0.03: "no worse" tolerates three points of score (0.85 -> 0.82 is 20% more errors, about
  the least a team notices). It must be below 0.05, since a candidate 5 points worse (0.80 vs 0.85)
  has to be promoted at most alpha of the time: at 0.03 that candidate is two points beyond the
  margin and is promoted ~0.1% of the time. 0.02 would need (3/2)^2 = 2.25x the cases.
- 650 cases in 5 looks of 130: power >= 0.8 (0.84) for a candidate as good as the stable on a
  0.85-accuracy task, assuming the two revisions give the same outcome on a case with probability
  rho = 0.7 beyond chance (outcome shared with probability rho, independent otherwise: 7.65% of the
  cases discordant). Power depends on how often the revisions disagree, not on the accuracy alone:
  at rho = 0.5 (12.75% discordant) 650 cases give ~0.65 and ~950-1000 are needed; at rho = 0.9,
  ~0.99. `approximate_power` and `required_sample_size` give the numbers for an observed disagreement.
  Early stopping uses ~77% of the planned cases for an equal candidate and ~51% for a worse one.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from statistics import NormalDist
from typing import Literal

Verdict = Literal["pass", "fail", "continue"]

DEFAULT_ALPHA = 0.05
DEFAULT_MARGIN = 0.03
DEFAULT_SAMPLE_SIZE = 650
DEFAULT_LOOKS = 5
DEFAULT_FUTILITY_CONDITIONAL_POWER = 0.10
MIN_LOOK_SIZE = 10
"""Interim looks smaller than this are skipped (the final look is always kept)."""
DEFAULT_MIN_REQUESTS = 20
"""Fewer requests than this make latency and error-rate checks `insufficient`, not a verdict."""

METHOD = (
    "paired score test for non-inferiority (Tango; empirical likelihood for fractional scores) "
    "with Bonett-Price pseudo-pairs, group-sequential with Lan-DeMets O'Brien-Fleming alpha "
    "spending and non-binding futility"
)

_STD_NORMAL = NormalDist()
_SQRT2 = math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


def norm_sf(z: float) -> float:
    """P(Z > z) for a standard normal Z, accurate far into the upper tail."""
    return 0.5 * math.erfc(z / _SQRT2)


def norm_isf(p: float) -> float:
    """The z with P(Z > z) = p, 0 < p < 1."""
    if not 0.0 < p < 1.0:
        raise ValueError(f"probability must be in (0, 1), got {p}")
    return -_STD_NORMAL.inv_cdf(p)


# ---------------------------------------------------------------------------------------------
# Group-sequential boundaries


def obrien_fleming_spending(t: float, total: float) -> float:
    """Lan-DeMets spending function of O'Brien-Fleming type: what is spent by information fraction t."""
    if t <= 0.0:
        return 0.0
    if t >= 1.0:
        return total
    return 2.0 * norm_sf(norm_isf(total / 2.0) / math.sqrt(t))


def _simpson(lo: float, hi: float, min_step: float) -> tuple[list[float], list[float]]:
    """Points and composite-Simpson weights on [lo, hi] with steps no wider than `min_step`."""
    intervals = max(16, math.ceil((hi - lo) / min_step))
    intervals = min(intervals + (intervals % 2), 2000)
    h = (hi - lo) / intervals
    points = [lo + i * h for i in range(intervals + 1)]
    weights = [(4.0 if i % 2 else 2.0) * h / 3.0 for i in range(intervals + 1)]
    weights[0] = weights[-1] = h / 3.0
    return points, weights


_LOWER_SD = 9.0  # the continuation density is integrated down to -9 sd (the rest is < 1e-18)
# ...and up to the boundary itself, or this many sd where there is none (spending below 1e-300).
# Stopping short of a boundary above 9 sd (an early look at a small alpha) dropped mass of the same
# order as the next looks' targets (~1e-19) and put their boundaries below z(alpha(t_k)).
_UPPER_SD = 38.0


@lru_cache(maxsize=256)
def spending_boundaries(fractions: tuple[float, ...], total: float) -> tuple[float, ...]:
    """One-sided upper critical values z_1..z_K for a standard-normal process observed at the
    information `fractions` (increasing, last = 1), such that under the null the probability of
    first crossing at look k is spending(t_k) - spending(t_{k-1}), spending being
    `obrien_fleming_spending` with `total`. Exact up to the numerical integration (~1e-6).

    On the Brownian scale W(t) = Z(t) sqrt(t) the increments are independent N(0, t_k - t_{k-1});
    the density of W on the continuation region is carried from look to look on a Simpson grid.
    """
    # Long on purpose: one numerical recursion (the density carried from look to look), kept whole
    # so that its invariants can be read and checked in one place.
    if not fractions or any(b <= a for a, b in itertools.pairwise(fractions)) or fractions[0] <= 0:
        raise ValueError(f"information fractions must increase from above 0: {fractions}")
    if not 0.0 < total < 1.0:
        raise ValueError(f"total must be in (0, 1), got {total}")
    bounds: list[float] = []
    spent = 0.0
    points: list[float] = []
    mass: list[float] = []  # Simpson weight x density of W on the continuation region
    prev_t = 0.0
    for k, t in enumerate(fractions):
        next_sd = math.sqrt(fractions[k + 1] - t) if k + 1 < len(fractions) else math.inf
        target = obrien_fleming_spending(t, total) - spent
        sd_step = math.sqrt(t - prev_t)
        if not bounds:
            z = norm_isf(target) if target > 0 else math.inf
            upper_w = z * math.sqrt(t)
        else:
            # Bound now: used right below, within this look (bugbear cannot tell).
            def crossing(u: float, points: list[float] = points, mass: list[float] = mass,
                         sd_step: float = sd_step) -> float:
                return sum(m * norm_sf((u - x) / sd_step) for x, m in zip(points, mass, strict=True))

            if target <= 1e-300:
                upper_w = math.inf
            else:
                lo, hi = points[0] - 10.0 * sd_step, points[-1] + 40.0 * sd_step
                for _ in range(100):
                    mid = 0.5 * (lo + hi)
                    if crossing(mid) > target:
                        lo = mid
                    else:
                        hi = mid
                    if hi - lo < 1e-10:
                        break
                upper_w = 0.5 * (lo + hi)
            z = upper_w / math.sqrt(t)
        bounds.append(z)
        spent += target
        # density of W(t) on the continuation region (-LOWER_SD sqrt(t), upper_w)
        lo_w = -_LOWER_SD * math.sqrt(t)
        hi_w = min(upper_w, _UPPER_SD * math.sqrt(t))
        step = min(sd_step, next_sd) / 8.0
        new_points, weights = _simpson(lo_w, hi_w, step)
        if not points:
            sd = math.sqrt(t)
            dens = [_INV_SQRT_2PI / sd * math.exp(-0.5 * (y / sd) ** 2) for y in new_points]
        else:
            inv = 1.0 / sd_step
            dens = []
            for y in new_points:
                acc = 0.0
                for x, m in zip(points, mass, strict=True):
                    u = (y - x) * inv
                    if -12.0 < u < 12.0:
                        acc += m * math.exp(-0.5 * u * u)
                dens.append(acc * inv * _INV_SQRT_2PI)
        points = new_points
        mass = [w * g for w, g in zip(weights, dens, strict=True)]
        prev_t = t
    return tuple(bounds)


def look_sizes(planned_n: int, looks: int = DEFAULT_LOOKS) -> list[int]:
    """Cases evaluated by each look: `looks` equal steps up to `planned_n` (rounded up), skipping
    interim looks below MIN_LOOK_SIZE and duplicates; the last is always `planned_n`."""
    if planned_n < 1:
        raise ValueError(f"planned_n must be >= 1, got {planned_n}")
    if looks < 1:
        raise ValueError(f"looks must be >= 1, got {looks}")
    sizes: list[int] = []
    for k in range(1, looks + 1):
        size = -(-planned_n * k // looks)
        if size < MIN_LOOK_SIZE and size != planned_n:
            continue
        if sizes and size <= sizes[-1]:
            continue
        sizes.append(size)
    return sizes


@dataclass(frozen=True)
class LookPlan:
    """Per look: cases, and the efficacy critical value (normal scale)."""

    sizes: tuple[int, ...]
    efficacy: tuple[float, ...]

    def nominal_alpha(self, look: int) -> float:
        """The one-sided level of look `look` (1-based) on its own."""
        return norm_sf(self.efficacy[look - 1])


@lru_cache(maxsize=256)
def look_plan(planned_n: int, looks: int = DEFAULT_LOOKS, alpha: float = DEFAULT_ALPHA) -> LookPlan:
    """The looks and their critical values for an evaluation of `planned_n` cases."""
    sizes = tuple(look_sizes(planned_n, looks))
    fractions = tuple(s / sizes[-1] for s in sizes)
    return LookPlan(sizes, spending_boundaries(fractions, alpha))


# ---------------------------------------------------------------------------------------------
# The paired score statistic

_LEVEL_DIGITS = 12  # differences are grouped after rounding away float noise (0.7 - 0.3 etc.)


@dataclass(frozen=True)
class PairedSummary:
    """What the decision needs from paired scores: counts of each distinct difference d = c - s and
    the sums of the scores. Additive over batches (`a + b`)."""

    n: int = 0
    stable_sum: float = 0.0
    candidate_sum: float = 0.0
    differences: tuple[tuple[float, int], ...] = ()
    """(d, how many pairs had it), ascending in d."""

    @classmethod
    def of(cls, stable_scores: Sequence[float], candidate_scores: Sequence[float]) -> PairedSummary:
        if len(stable_scores) != len(candidate_scores):
            raise ValueError(
                f"paired scores differ in length: {len(stable_scores)} stable, {len(candidate_scores)} candidate")
        counts: dict[float, int] = {}
        for i, (s, c) in enumerate(zip(stable_scores, candidate_scores, strict=True)):
            for name, v in (("stable", s), ("candidate", c)):
                if not 0.0 <= v <= 1.0:  # also rejects NaN
                    raise ValueError(f"{name} score of pair #{i} is {v!r}, not in [0, 1]")
            d = round(float(c) - float(s), _LEVEL_DIGITS) + 0.0  # + 0.0: no -0.0
            counts[d] = counts.get(d, 0) + 1
        return cls(len(stable_scores), math.fsum(stable_scores), math.fsum(candidate_scores),
                   tuple(sorted(counts.items())))

    @classmethod
    def binary(cls, *, both: int = 0, stable_only: int = 0, candidate_only: int = 0, neither: int = 0) -> PairedSummary:
        """0/1 scores as the four counts of a paired 2x2 table."""
        n = both + stable_only + candidate_only + neither
        if min(both, stable_only, candidate_only, neither) < 0:
            raise ValueError("counts must be >= 0")
        levels = tuple((d, k) for d, k in ((-1.0, stable_only), (0.0, both + neither), (1.0, candidate_only)) if k)
        return cls(n, float(both + stable_only), float(both + candidate_only), levels)

    def __add__(self, other: PairedSummary) -> PairedSummary:
        counts = dict(self.differences)
        for d, k in other.differences:
            counts[d] = counts.get(d, 0) + k
        return PairedSummary(self.n + other.n, self.stable_sum + other.stable_sum,
                             self.candidate_sum + other.candidate_sum, tuple(sorted(counts.items())))

    def augmented(self) -> tuple[list[tuple[float, int]], int, float]:
        """The differences with the two pseudo-pairs (+1 and -1): (levels, N, mean)."""
        counts = dict(self.differences)
        counts[-1.0] = counts.get(-1.0, 0) + 1
        counts[1.0] = counts.get(1.0, 0) + 1
        levels = sorted(counts.items())
        total = self.n + 2
        return levels, total, math.fsum(d * k for d, k in levels) / total


def _binary_restricted_variance(minus: int, plus: int, total: int, mu0: float) -> float:
    """Tango's restricted MLE for 0/1 pairs: `minus` pairs with d = -1, `plus` with d = +1, the rest
    0; the multinomial MLE of (q, r) = (P(-1), P(+1)) subject to r - q = mu0 is the root in the
    feasible range of  2N q^2 - B q - minus mu0 (1 - mu0) = 0,
    B = minus (1 - 3 mu0) + plus (1 - mu0) - 2 zero mu0; returns q + r - mu0^2."""
    zero = total - minus - plus
    b = minus * (1.0 - 3.0 * mu0) + plus * (1.0 - mu0) - 2.0 * zero * mu0
    root = math.sqrt(max(b * b + 8.0 * total * minus * mu0 * (1.0 - mu0), 0.0))
    lo, hi = max(0.0, -mu0), (1.0 - mu0) / 2.0
    q = (b + root) / (4.0 * total)
    if not lo - 1e-12 <= q <= hi + 1e-12:
        q = (b - root) / (4.0 * total)
    q = min(max(q, lo), hi)
    return max(2.0 * q + mu0 - mu0 * mu0, 0.0)


def _el_restricted_variance(levels: Sequence[tuple[float, int]], total: int, mu0: float) -> float:
    """Empirical likelihood: weights w_j = k_j / (N (1 + lam (d_j - mu0))) with sum w_j d_j = mu0;
    returns sum w_j (d_j - mu0)^2. Needs min d < mu0 < max d (the pseudo-pairs see to it)."""
    shifted = [(d - mu0, k) for d, k in levels]
    a_max = max(a for a, _ in shifted)
    a_min = min(a for a, _ in shifted)
    if a_max <= 0.0 or a_min >= 0.0:
        return 0.0
    lo, hi = -1.0 / a_max, -1.0 / a_min  # 1 + lam a > 0 for every level inside (lo, hi)
    lam = 0.0
    for _ in range(200):
        g = dg = 0.0
        for a, k in shifted:
            inv = 1.0 / (1.0 + lam * a)
            g += k * a * inv
            dg -= k * a * a * inv * inv
        if g > 0.0:  # g decreases in lam: the root is above
            lo = lam
        else:
            hi = lam
        if abs(g) <= 1e-13 * total or hi - lo <= 1e-15 * max(1.0, abs(lam)):
            break
        step = lam - g / dg
        lam = step if lo < step < hi else 0.5 * (lo + hi)
    return math.fsum(k * a * a / (1.0 + lam * a) for a, k in shifted) / total


def _restricted_variance_of(summary: PairedSummary) -> tuple[Callable[[float], float], int, float]:
    """(mu0 -> V0(mu0), N, mean) for the augmented differences of `summary`."""
    levels, total, mean = summary.augmented()
    if all(d in (-1.0, 0.0, 1.0) for d, _ in levels):
        counts = dict(levels)
        minus, plus = counts.get(-1.0, 0), counts.get(1.0, 0)

        def variance(mu0: float) -> float:
            return _binary_restricted_variance(minus, plus, total, mu0) if -1.0 < mu0 < 1.0 else 0.0
    else:
        def variance(mu0: float) -> float:
            return _el_restricted_variance(levels, total, mu0) if -1.0 < mu0 < 1.0 else 0.0
    return variance, total, mean


def restricted_variance(summary: PairedSummary, mu0: float) -> float:
    """V0(mu0): the variance of d under the distribution nearest the (augmented) data with mean mu0."""
    return _restricted_variance_of(summary)[0](mu0)


def score_statistic(summary: PairedSummary, mu0: float) -> float:
    """Z(mu0) = (dbar - mu0) / sqrt(V0(mu0) / N) on the augmented differences."""
    variance, total, mean = _restricted_variance_of(summary)
    v0 = variance(mu0)
    if v0 <= 0.0:
        return math.copysign(math.inf, mean - mu0) if mean != mu0 else 0.0
    return (mean - mu0) / math.sqrt(v0 / total)


def _illinois(f: Callable[[float], float], a: float, fa: float, b: float, fb: float) -> float:
    """A root of f in [a, b] where fa, fb have opposite signs (regula falsi, Illinois variant)."""
    side = 0
    c = a
    for _ in range(200):
        c = (a * fb - b * fa) / (fb - fa)
        fc = f(c)
        if fc == 0.0:
            return c
        if (fc > 0.0) == (fb > 0.0):
            b, fb = c, fc
            if side == -1:
                fa *= 0.5
            side = -1
        else:
            a, fa = c, fc
            if side == 1:
                fb *= 0.5
            side = 1
        if abs(b - a) <= 1e-11:
            break
    return c


def _bracketed_root(f: Callable[[float], float], start: float, f_start: float, end: float, f_end: float,
                    guess: float) -> float:
    """The root of f between `start` (f < 0 there) and `end` (f > 0), searched from `guess` outwards
    so that the final bracket is narrow; deterministic."""
    inner, f_inner = start, f_start
    direction = 1.0 if end > start else -1.0
    step = abs(guess - start)
    point = guess
    for _ in range(60):
        if (point - end) * direction >= 0.0:
            break
        f_point = f(point)
        if f_point > 0.0:
            return _illinois(f, inner, f_inner, point, f_point)
        inner, f_inner = point, f_point
        step *= 0.5 if step > 0.0 else 1.0
        point = inner + direction * max(step, 1e-9)
    return _illinois(f, inner, f_inner, end, f_end)


def score_bounds(summary: PairedSummary, critical: float) -> tuple[float, float]:
    """(low, high): the mu0 below and above the mean where |Z(mu0)| = critical (the test inverted);
    (-1, 1) for an infinite critical value."""
    if math.isinf(critical):
        return -1.0, 1.0
    variance, total, mean = _restricted_variance_of(summary)
    c2 = critical * critical

    # g(mu0) = N (mean - mu0)^2 - c^2 V0(mu0): negative at the mean, positive at -1 and +1 (V0 = 0)
    def g(mu0: float) -> float:
        return total * (mean - mu0) ** 2 - c2 * variance(mu0)

    at_mean = g(mean)
    if at_mean >= 0.0:  # critical = 0
        return mean, mean
    # start from the Wald bound (observed variance): usually within a few per cent of the root
    half = critical * math.sqrt(max(-at_mean / c2, 0.0) / total)
    low = _bracketed_root(g, mean, at_mean, -1.0, total * (mean + 1.0) ** 2, max(mean - half, -1.0))
    high = _bracketed_root(g, mean, at_mean, 1.0, total * (1.0 - mean) ** 2, min(mean + half, 1.0))
    return max(-1.0, low), min(1.0, high)


def wilson_upper(mean: float, n: int, critical: float) -> float:
    """Upper Wilson score bound of a mean of n scores in [0, 1] (variance <= p (1 - p))."""
    if n <= 0 or math.isinf(critical):
        return 1.0
    c2n = critical * critical / n
    center = (mean + c2n / 2.0) / (1.0 + c2n)
    half = critical * math.sqrt(max(mean * (1.0 - mean), 0.0) / n + c2n / (4.0 * n)) / (1.0 + c2n)
    return min(1.0, center + half)


def conditional_power(summary: PairedSummary, *, margin: float, planned_n: int, final_critical: float) -> float:
    """P(the final look passes | the data so far), were the candidate exactly as good as the stable
    (mu = 0): Brownian-motion approximation on the information scale t = n / planned_n,
    B(t) = Z(-margin) sqrt(t), drift theta = margin / sqrt(V0(0) / (planned_n + 2))."""
    t = summary.n / planned_n
    if t >= 1.0:
        return 1.0 if score_statistic(summary, -margin) > final_critical else 0.0
    v0 = restricted_variance(summary, 0.0)
    if v0 <= 0.0:
        return 1.0
    theta = margin / math.sqrt(v0 / (planned_n + 2))
    b = score_statistic(summary, -margin) * math.sqrt(t)
    if math.isinf(b):
        return 1.0 if b > 0 else 0.0
    return norm_sf((final_critical - b - theta * (1.0 - t)) / math.sqrt(1.0 - t))


# ---------------------------------------------------------------------------------------------
# The decision


@dataclass(frozen=True)
class PairedResult:
    """What an evaluation found: means, difference (candidate - stable) and its bounds.

    [ci_low, ci_high] are repeated confidence bounds: each end holds at one-sided `confidence`
    (= 1 - alpha) across all looks together; at the look that produced them each end used
    `critical_value` (normal scale), a nominal one-sided level of `nominal_alpha`.
    """

    n: int
    stable_mean: float
    candidate_mean: float
    difference: float
    ci_low: float
    ci_high: float
    confidence: float
    method: str = METHOD
    critical_value: float = math.inf
    nominal_alpha: float = 0.0


@dataclass(frozen=True)
class Decision:
    verdict: Verdict
    result: PairedResult
    look: int
    """1-based look that decided (0: not enough cases for the first look yet)."""
    looks: int
    """Looks planned (after `look_sizes` dropped too-small ones)."""
    planned_n: int
    reason: str


def _fmt(x: float) -> str:
    return f"{x:+.4f}"


def decide_summary(summary: PairedSummary, *, margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA,
                   planned_n: int = DEFAULT_SAMPLE_SIZE, looks: int = DEFAULT_LOOKS,
                   minimum_score: float | None = None,
                   futility_conditional_power: float = DEFAULT_FUTILITY_CONDITIONAL_POWER) -> Decision:
    """The decision for a summary of exactly a look's cases, or fewer than the first look (see
    `decide` for the rule). Raises ValueError for any other count."""
    # One function on purpose: the rule is a sequence of checks on one summary (parameters, the
    # look, the boundaries, futility), each reading what the previous one computed.
    _check_parameters(margin, alpha, planned_n, looks, minimum_score, futility_conditional_power)
    plan = look_plan(planned_n, looks, alpha)
    n = summary.n
    if n in plan.sizes:
        look = plan.sizes.index(n) + 1
    elif n < plan.sizes[0]:
        look = 0
    else:
        raise ValueError(f"{n} cases is not a look of {list(plan.sizes)}; decide() takes any count")
    total_looks = len(plan.sizes)
    final = look == total_looks
    critical = plan.efficacy[max(look, 1) - 1]
    low, high = score_bounds(summary, critical)
    stable_mean = summary.stable_sum / n if n else 0.0
    candidate_mean = summary.candidate_sum / n if n else 0.0
    result = PairedResult(
        n=n,
        stable_mean=stable_mean,
        candidate_mean=candidate_mean,
        difference=candidate_mean - stable_mean,
        ci_low=low,
        ci_high=high,
        confidence=1.0 - alpha,
        critical_value=critical,
        nominal_alpha=norm_sf(critical),
    )

    def decision(verdict: Verdict, reason: str) -> Decision:
        return Decision(verdict, result, look, total_looks, planned_n, reason)

    if look == 0:
        return decision("continue", f"{n} cases so far; the first look is at {plan.sizes[0]}")
    where = f"look {look} of {total_looks}, {n} of {planned_n} cases"
    found = f"difference {_fmt(result.difference)}, bounds [{_fmt(low)}, {_fmt(high)}]"
    if high < -margin:
        return decision("fail", f"inferior: upper bound {_fmt(high)} < -margin {_fmt(-margin)} ({found}; {where})")
    if minimum_score is not None:
        candidate_high = wilson_upper(candidate_mean, n, critical)
        if candidate_high < minimum_score:
            return decision("fail", f"below the minimum score: candidate {candidate_mean:.4f}, upper bound "
                                    f"{candidate_high:.4f} < {minimum_score:.4f} ({where})")
    if not final and futility_conditional_power > 0.0:
        power = conditional_power(summary, margin=margin, planned_n=planned_n, final_critical=plan.efficacy[-1])
        if power < futility_conditional_power:
            return decision("fail", f"futility: even if the candidate were as good as the stable, it would pass "
                                    f"with probability {power:.3f} < {futility_conditional_power:.2f} "
                                    f"({found}; {where})")
    below_floor = minimum_score is not None and candidate_mean < minimum_score
    if low > -margin and not below_floor:
        return decision("pass", f"non-inferior: lower bound {_fmt(low)} > -margin {_fmt(-margin)} ({found}; {where})")
    if not final:
        return decision("continue", f"undecided ({found}; {where})")
    if low > -margin:
        return decision("fail", f"below the minimum score: candidate {candidate_mean:.4f} < {minimum_score:.4f} "
                                f"({found}; {where})")
    return decision("fail", f"not shown non-inferior: lower bound {_fmt(low)} <= -margin {_fmt(-margin)} "
                            f"({found}; {where})")


def decide(stable_scores: Sequence[float], candidate_scores: Sequence[float], *,
           margin: float = DEFAULT_MARGIN, alpha: float = DEFAULT_ALPHA, planned_n: int = DEFAULT_SAMPLE_SIZE,
           looks: int = DEFAULT_LOOKS, minimum_score: float | None = None,
           futility_conditional_power: float = DEFAULT_FUTILITY_CONDITIONAL_POWER) -> Decision:
    """PASS, FAIL or CONTINUE for the paired scores evaluated so far.

    `stable_scores[i]` and `candidate_scores[i]` are the two revisions' scores on case i, in the
    evaluation's case order (a random order, so any prefix is a random sample). The decision is
    taken at the latest look reached, on exactly that look's first `look_sizes(planned_n, looks)[k]`
    pairs: pairs beyond it wait for the next look, pairs beyond `planned_n` are ignored. Fewer pairs
    than the first look: CONTINUE (look 0). `planned_n` must not exceed the cases the dataset has.
    Raises ValueError on unequal lengths, scores outside [0, 1] or parameters out of range.
    """
    if len(stable_scores) != len(candidate_scores):
        raise ValueError(
            f"paired scores differ in length: {len(stable_scores)} stable, {len(candidate_scores)} candidate")
    _check_parameters(margin, alpha, planned_n, looks, minimum_score, futility_conditional_power)
    sizes = look_plan(planned_n, looks, alpha).sizes
    reached = [s for s in sizes if s <= len(stable_scores)]
    n = reached[-1] if reached else len(stable_scores)
    summary = PairedSummary.of(stable_scores[:n], candidate_scores[:n])
    return decide_summary(summary, margin=margin, alpha=alpha, planned_n=planned_n, looks=looks,
                          minimum_score=minimum_score, futility_conditional_power=futility_conditional_power)


def approximate_power(planned_n: int, *, discordant_share: float, margin: float = DEFAULT_MARGIN,
                      alpha: float = DEFAULT_ALPHA, looks: int = DEFAULT_LOOKS) -> float:
    """Normal approximation of the chance that a candidate exactly as good as the stable passes an
    evaluation of `planned_n` 0/1 cases on which the revisions disagree with probability
    `discordant_share` (the variance of d under mu = 0): Phi(margin sqrt(N) / sigma - c_K). It
    ignores early looks and futility (within a few points of the benchmark's simulations); for
    warnings and planning, not for decisions."""
    if not 0.0 < discordant_share <= 1.0:
        raise ValueError(f"discordant_share must be in (0, 1], got {discordant_share}")
    final_critical = look_plan(planned_n, looks, alpha).efficacy[-1]
    return norm_sf(final_critical - margin * math.sqrt(planned_n + 2) / math.sqrt(discordant_share))


def required_sample_size(*, discordant_share: float, power: float = 0.8, margin: float = DEFAULT_MARGIN,
                         alpha: float = DEFAULT_ALPHA, looks: int = DEFAULT_LOOKS, limit: int = 100_000) -> int:
    """The smallest planned_n whose `approximate_power` reaches `power` (`limit` if none does)."""
    if margin <= 0.0:
        return limit
    lo, hi = 1, limit
    if approximate_power(hi, discordant_share=discordant_share, margin=margin, alpha=alpha, looks=looks) < power:
        return limit
    while lo < hi:
        mid = (lo + hi) // 2
        if approximate_power(mid, discordant_share=discordant_share, margin=margin, alpha=alpha, looks=looks) >= power:
            hi = mid
        else:
            lo = mid + 1
    return lo


def _check_parameters(margin: float, alpha: float, planned_n: int, looks: int, minimum_score: float | None,
                      futility_conditional_power: float) -> None:
    if not 0.0 <= margin < 1.0:
        raise ValueError(f"margin must be in [0, 1), got {margin}")
    if not 0.0 < alpha <= 0.5:
        raise ValueError(f"alpha must be in (0, 0.5], got {alpha}")
    if not 0.0 <= futility_conditional_power < 1.0:
        raise ValueError(f"futility_conditional_power must be in [0, 1), got {futility_conditional_power}")
    if planned_n < 1 or looks < 1:
        raise ValueError(f"planned_n and looks must be >= 1, got {planned_n}, {looks}")
    if minimum_score is not None and not 0.0 <= minimum_score <= 1.0:
        raise ValueError(f"minimum_score must be in [0, 1], got {minimum_score}")


def alpha_from_confidence(confidence: float) -> float:
    """evaluation.confidence (1 - alpha) -> alpha."""
    if not 0.5 <= confidence < 1.0:
        raise ValueError(f"confidence must be in [0.5, 1), got {confidence}")
    return round(1.0 - confidence, 12)


# ---------------------------------------------------------------------------------------------
# Latency and errors


OperationalVerdict = Literal["pass", "fail", "insufficient"]


@dataclass(frozen=True)
class OperationalCheck:
    verdict: OperationalVerdict
    requests: int
    error_rate: float | None
    p95_latency_seconds: float | None
    reasons: tuple[str, ...] = ()


def check_operational(*, requests: int, errors: int, p95_latency_seconds: float | None,
                      max_p95_latency_seconds: float | None = None, max_error_rate: float | None = None,
                      min_requests: int = DEFAULT_MIN_REQUESTS) -> OperationalCheck:
    """p95 latency and error rate (point estimates) against their thresholds (None: not checked).
    Below `min_requests` requests the result is `insufficient` (no verdict yet)."""
    if requests < 0 or errors < 0 or errors > requests:
        raise ValueError(f"bad counts: {errors} errors of {requests} requests")
    error_rate = errors / requests if requests else None
    if requests < min_requests:
        return OperationalCheck("insufficient", requests, error_rate, p95_latency_seconds,
                                (f"{requests} requests, fewer than {min_requests}",))
    reasons = []
    if max_error_rate is not None and error_rate is not None and error_rate > max_error_rate:
        reasons.append(f"error rate {error_rate:.4f} > {max_error_rate:.4f} ({errors} of {requests})")
    if max_p95_latency_seconds is not None and p95_latency_seconds is not None \
            and p95_latency_seconds > max_p95_latency_seconds:
        reasons.append(f"p95 latency {p95_latency_seconds:.3f}s > {max_p95_latency_seconds:.3f}s")
    return OperationalCheck("fail" if reasons else "pass", requests, error_rate, p95_latency_seconds, tuple(reasons))


def combine(decision: Decision, operational: OperationalCheck | None = None) -> tuple[Verdict, str]:
    """An evaluation step's verdict from the score decision and the candidate's latency/error check:
    any fail fails; otherwise the score decision's verdict (an `insufficient` check does not hold
    up a pass: the score test already needed enough cases)."""
    if operational is not None and operational.verdict == "fail":
        return "fail", "; ".join(operational.reasons)
    return decision.verdict, decision.reason
