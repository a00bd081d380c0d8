"""The promote/rollback statistics: boundaries, the paired score test, sequential decisions, checks."""

import itertools
import math
import random

import pytest
from hypothesis import assume, example, given, settings
from hypothesis import strategies as st

from slmfleet.evaluation.stats import (
    DEFAULT_ALPHA,
    DEFAULT_LOOKS,
    DEFAULT_MARGIN,
    DEFAULT_SAMPLE_SIZE,
    METHOD,
    MIN_LOOK_SIZE,
    PairedSummary,
    _binary_restricted_variance,
    _el_restricted_variance,
    alpha_from_confidence,
    approximate_power,
    check_operational,
    combine,
    conditional_power,
    decide,
    decide_summary,
    look_plan,
    look_sizes,
    obrien_fleming_spending,
    required_sample_size,
    restricted_variance,
    score_bounds,
    score_statistic,
    spending_boundaries,
    wilson_upper,
)

FAST = settings(max_examples=150, deadline=None)
SLOW = settings(max_examples=40, deadline=None)


def paired(rng, n, stable, candidate, rho):
    """0/1 pairs: with probability rho one uniform decides both outcomes, otherwise independent."""
    s, c = [], []
    for _ in range(n):
        if rng.random() < rho:
            u = rng.random()
            s.append(float(u < stable))
            c.append(float(u < candidate))
        else:
            s.append(float(rng.random() < stable))
            c.append(float(rng.random() < candidate))
    return s, c


def sequentially(s, c, **kw):
    """Decide look by look, as the runner does, until the verdict is no longer `continue`."""
    planned = kw.get("planned_n", DEFAULT_SAMPLE_SIZE)
    for size in look_sizes(planned, kw.get("looks", DEFAULT_LOOKS)):
        d = decide(s[:size], c[:size], **kw)
        if d.verdict != "continue":
            return d
    return d


counts = st.integers(0, 400)


# --- group-sequential boundaries -------------------------------------------------------------


def test_obrien_fleming_boundaries_match_published_values():
    # Lan-DeMets O'Brien-Fleming spending, 5 equally spaced looks, one-sided 0.025 (gsDesign sfLDOF)
    published = [4.8769, 3.3569, 2.6803, 2.2898, 2.0310]
    got = spending_boundaries((0.2, 0.4, 0.6, 0.8, 1.0), 0.025)
    assert got == pytest.approx(published, abs=2e-4)
    # two looks at half and full information
    assert spending_boundaries((0.5, 1.0), 0.025) == pytest.approx([2.9626, 1.9686], abs=2e-4)
    # one look is the fixed-sample test
    assert spending_boundaries((1.0,), 0.05) == pytest.approx([1.6449], abs=1e-4)


def test_spending_function_spends_alpha_by_the_end():
    assert obrien_fleming_spending(1.0, 0.05) == pytest.approx(0.05)
    assert obrien_fleming_spending(0.0, 0.05) == 0.0
    values = [obrien_fleming_spending(t / 10, 0.05) for t in range(11)]
    assert values == sorted(values)


@SLOW
@given(st.lists(st.floats(0.05, 0.95), min_size=1, max_size=4, unique=True), st.sampled_from([0.01, 0.025, 0.05, 0.1]))
# Found by a random run: look 1's boundary above 9 sd, where the continuation density was cut off.
@example(interims=[0.078125, 0.0546875], alpha=0.01)
def test_boundaries_lie_between_their_bonferroni_limits(interims, alpha):
    # P(first exit at k) = spent_k <= P(Z_k > c_k) <= P(exit by k) = alpha(t_k), hence
    # z(alpha(t_k)) <= c_k <= z(spent_k): exact bounds any correct recursion must respect
    fractions = tuple(sorted(round(f, 3) for f in set(interims))) + (1.0,)
    assume(all(b - a > 0.02 for a, b in itertools.pairwise(fractions)))
    bounds = spending_boundaries(fractions, alpha)
    previous = 0.0
    for t, c in zip(fractions, bounds, strict=True):
        cumulative = obrien_fleming_spending(t, alpha)
        spent = cumulative - previous
        previous = cumulative
        # 1e-4 on z: at the extreme tails hypothesis finds (z ~ 8, p ~ 1e-16) the numerical
        # integration of the recursion is good to about 1e-5, far below what could change a verdict.
        assert spending_boundaries((1.0,), cumulative)[0] - 1e-4 <= c
        assert c <= spending_boundaries((1.0,), spent)[0] + 1e-4


@FAST
@given(st.integers(1, 5000), st.integers(1, 12))
def test_look_sizes(planned_n, looks):
    sizes = look_sizes(planned_n, looks)
    assert sizes[-1] == planned_n
    assert sizes == sorted(set(sizes))
    assert len(sizes) <= looks
    assert all(s >= MIN_LOOK_SIZE for s in sizes[:-1])


def test_default_plan():
    plan = look_plan(DEFAULT_SAMPLE_SIZE, DEFAULT_LOOKS, DEFAULT_ALPHA)
    assert plan.sizes == (130, 260, 390, 520, 650)
    assert plan.efficacy == pytest.approx([4.2292, 2.8881, 2.2981, 1.9618, 1.7397], abs=2e-4)
    assert DEFAULT_MARGIN < 0.05  # a 5-points-worse candidate must be on the rejected side


# --- the paired score statistic --------------------------------------------------------------


@FAST
@given(st.integers(1, 200), st.integers(1, 200), st.integers(0, 2000), st.floats(-0.99, 0.99))
def test_tango_closed_form_equals_empirical_likelihood(minus, plus, zero, mu0):
    total = minus + plus + zero
    levels = [(-1.0, minus), (1.0, plus)] + ([(0.0, zero)] if zero else [])
    fast = _binary_restricted_variance(minus, plus, total, mu0)
    general = _el_restricted_variance(sorted(levels), total, mu0)
    assert fast == pytest.approx(general, rel=1e-9, abs=1e-12)


@FAST
@given(counts, counts, counts, counts, st.floats(0.3, 5.0))
def test_bounds_invert_the_score_statistic(both, s_only, c_only, neither, critical):
    summary = PairedSummary.binary(both=both, stable_only=s_only, candidate_only=c_only, neither=neither)
    low, high = score_bounds(summary, critical)
    assert -1.0 <= low < high <= 1.0
    assert score_statistic(summary, low) == pytest.approx(critical, abs=1e-6)
    assert score_statistic(summary, high) == pytest.approx(-critical, abs=1e-6)
    # a stricter critical value widens the interval
    low2, high2 = score_bounds(summary, critical * 1.5)
    assert low2 < low and high2 > high


@FAST
@given(counts, st.integers(1, 400), counts, counts)
def test_a_better_candidate_never_lowers_the_lower_bound(both, s_only, c_only, neither):
    # turn one "stable only" case into "candidate only": the candidate improved on that case
    before = PairedSummary.binary(both=both, stable_only=s_only, candidate_only=c_only, neither=neither)
    after = PairedSummary.binary(both=both, stable_only=s_only - 1, candidate_only=c_only + 1, neither=neither)
    assert score_bounds(after, 1.96)[0] > score_bounds(before, 1.96)[0]
    assert score_statistic(after, -0.03) > score_statistic(before, -0.03)


def test_no_disagreement_is_not_proof_at_small_n():
    # 20 cases, identical answers: the pseudo-pairs keep the interval honest (Wald would be [0, 0])
    summary = PairedSummary.binary(both=17, neither=3)
    low, high = score_bounds(summary, 1.645)
    assert low < -0.05 and high > 0.05
    # and with many cases it narrows
    low, high = score_bounds(PairedSummary.binary(both=1700, neither=300), 1.645)
    assert -0.005 < low < 0 < high < 0.005


def test_summary_of_scores_equals_binary_counts_and_adds_up():
    s = [1, 1, 0, 0, 1, 0, 1]
    c = [1, 0, 1, 0, 1, 0, 0]
    summary = PairedSummary.of(s, c)
    assert summary == PairedSummary.binary(both=2, stable_only=2, candidate_only=1, neither=2)
    assert PairedSummary.of(s[:3], c[:3]) + PairedSummary.of(s[3:], c[3:]) == summary
    # float noise in fractional scores is grouped away
    frac = PairedSummary.of([0.3, 0.1], [0.7, 0.5])
    assert frac.differences == ((0.4, 2),)


def test_fractional_scores_use_empirical_likelihood():
    rng = random.Random(3)
    s = [rng.choice([0, 0.5, 1]) for _ in range(300)]
    c = [rng.choice([0, 0.5, 1]) for _ in range(300)]
    summary = PairedSummary.of(s, c)
    assert len(summary.differences) > 3
    low, high = score_bounds(summary, 1.96)
    assert low < summary.candidate_sum / 300 - summary.stable_sum / 300 < high
    assert score_statistic(summary, low) == pytest.approx(1.96, abs=1e-6)
    assert restricted_variance(summary, 0.0) > 0


def test_scores_must_be_paired_and_in_range():
    with pytest.raises(ValueError, match="length"):
        decide([1, 0], [1])
    with pytest.raises(ValueError, match="not in"):
        decide([1.5], [1])
    with pytest.raises(ValueError, match="not in"):
        decide([math.nan], [1])
    with pytest.raises(ValueError):
        decide([1], [1], alpha=0.7)
    with pytest.raises(ValueError):
        decide([1], [1], margin=-0.1)


# --- decisions -------------------------------------------------------------------------------


@SLOW
@given(st.integers(0, 2**32), st.integers(0, 700), st.floats(0.5, 0.95), st.floats(-0.1, 0.05))
def test_decisions_are_deterministic_and_consistent_with_their_bounds(seed, n, p, diff):
    rng = random.Random(seed)
    s, c = paired(rng, n, p, min(1.0, max(0.0, p + diff)), 0.6)
    first = decide(s, c)
    assert decide(list(s), list(c)) == first
    assert first.result.method == METHOD
    assert first.verdict in ("pass", "fail", "continue")
    if first.verdict == "pass":
        assert first.result.ci_low > -DEFAULT_MARGIN
    if first.look == len(look_sizes(DEFAULT_SAMPLE_SIZE)):
        assert first.verdict != "continue"
    if first.result.ci_high < -DEFAULT_MARGIN and first.look:
        assert first.verdict == "fail"


def test_identical_scores_pass_with_enough_cases():
    rng = random.Random(7)
    s = [float(rng.random() < 0.85) for _ in range(DEFAULT_SAMPLE_SIZE)]
    d = sequentially(s, list(s))
    assert d.verdict == "pass"
    assert d.look <= 3  # no disagreement at all is clear before the end
    assert d.result.difference == 0.0


def test_identical_scores_do_not_pass_on_a_handful_of_cases():
    s = [1.0] * 17 + [0.0] * 3
    d = decide(s, s, planned_n=20, looks=1)
    assert d.verdict == "fail"
    assert "not shown non-inferior" in d.reason


def test_a_clearly_worse_candidate_fails_at_the_first_look():
    rng = random.Random(11)
    s, c = paired(rng, DEFAULT_SAMPLE_SIZE, 0.9, 0.6, 0.5)
    d = sequentially(s, c)
    assert d.verdict == "fail"
    assert d.look == 1 and d.result.n == 130
    assert d.reason.startswith("inferior")


def test_a_somewhat_worse_candidate_stops_for_futility_before_the_end():
    rng = random.Random(5)
    s, c = paired(rng, DEFAULT_SAMPLE_SIZE, 0.85, 0.79, 0.7)
    d = sequentially(s, c)
    assert d.verdict == "fail"
    assert d.look < 5


def test_decide_uses_exactly_the_latest_look():
    rng = random.Random(2)
    s, c = paired(rng, 1000, 0.85, 0.85, 0.7)
    early = decide(s[:129], c[:129])
    assert early.verdict == "continue" and early.look == 0 and early.result.n == 129
    at_200 = decide(s[:200], c[:200])
    assert at_200.look == 1 and at_200.result.n == 130
    assert at_200 == decide(s[:130], c[:130])
    beyond = decide(s, c)  # more cases than planned: the final look on the first 650
    assert beyond.result.n == DEFAULT_SAMPLE_SIZE and beyond.look == 5
    assert beyond == decide_summary(PairedSummary.of(s[:650], c[:650]))
    with pytest.raises(ValueError, match="not a look"):
        decide_summary(PairedSummary.of(s[:200], c[:200]))


def test_minimum_score():
    rng = random.Random(4)
    s, c = paired(rng, 400, 0.72, 0.72, 1.0)  # identical answers: non-inferior for sure
    assert decide(s, c, planned_n=400).verdict == "pass"
    mean = sum(c) / 400
    # a floor above the candidate's observed mean: not promoted
    d = decide(s, c, planned_n=400, minimum_score=mean + 0.01)
    assert d.verdict in ("fail", "continue")
    d = decide(s, c, planned_n=400, looks=1, minimum_score=mean + 0.01)
    assert d.verdict == "fail" and "minimum score" in d.reason
    # far above: fails at the first look
    d = sequentially(s, c, planned_n=400, minimum_score=0.95)
    assert d.verdict == "fail" and d.look == 1 and "minimum score" in d.reason
    # below the mean: no effect
    assert decide(s, c, planned_n=400, minimum_score=mean - 0.05).verdict == "pass"


def test_wilson_upper_bound():
    assert wilson_upper(0.0, 10, 1.96) == pytest.approx(0.2775, abs=1e-3)
    assert wilson_upper(1.0, 10, 1.96) == 1.0
    assert wilson_upper(0.5, 100, 1.96) == pytest.approx(0.5967, abs=1e-3)


def test_ci_contains_the_true_difference_most_of_the_time():
    # one look: [ci_low, ci_high] is a two-sided 90% interval at alpha = 0.05
    rng = random.Random(20251121)
    covered = 0
    runs = 600
    for _ in range(runs):
        p_s = rng.uniform(0.6, 0.95)
        p_c = min(0.99, max(0.3, p_s + rng.uniform(-0.08, 0.05)))
        rho = rng.choice([0.3, 0.6, 0.9])
        s, c = paired(rng, 200, p_s, p_c, rho)
        r = decide(s, c, planned_n=200, looks=1).result
        covered += r.ci_low <= p_c - p_s <= r.ci_high
    assert covered / runs >= 0.86


def test_repeated_confidence_bounds_cover_at_every_look():
    rng = random.Random(99)
    covered_everywhere = 0
    runs = 300
    for _ in range(runs):
        s, c = paired(rng, DEFAULT_SAMPLE_SIZE, 0.85, 0.83, 0.7)
        ok = True
        for size in look_sizes(DEFAULT_SAMPLE_SIZE):
            r = decide(s[:size], c[:size]).result
            ok &= r.ci_low <= -0.02 <= r.ci_high
        covered_everywhere += ok
    assert covered_everywhere / runs >= 0.86


def test_false_promotion_is_rare_in_a_small_simulation():
    # the benchmark does this at scale (bench/rollout_decision.py); here a quick sanity check
    rng = random.Random(1)
    promoted = 0
    for _ in range(200):
        s, c = paired(rng, DEFAULT_SAMPLE_SIZE, 0.85, 0.80, 0.7)
        promoted += sequentially(s, c).verdict == "pass"
    assert promoted <= 5


def test_conditional_power_and_planning():
    good = PairedSummary.binary(both=110, neither=15, stable_only=3, candidate_only=2)
    bad = PairedSummary.binary(both=100, neither=10, stable_only=18, candidate_only=2)
    kw = dict(margin=0.03, planned_n=650, final_critical=1.74)
    assert conditional_power(good, **kw) > 0.5
    assert conditional_power(bad, **kw) < 0.1
    assert 0.0 <= conditional_power(bad, **kw) <= 1.0
    powers = [approximate_power(n, discordant_share=0.0765) for n in (100, 300, 650, 1000)]
    assert powers == sorted(powers) and powers[2] > 0.8
    assert 500 < required_sample_size(discordant_share=0.0765) <= DEFAULT_SAMPLE_SIZE
    assert required_sample_size(discordant_share=0.0765, margin=0.02) > 2 * 500


def test_alpha_from_confidence():
    assert alpha_from_confidence(0.95) == 0.05
    with pytest.raises(ValueError):
        alpha_from_confidence(1.0)


# --- latency and errors ----------------------------------------------------------------------


def test_operational_checks():
    ok = check_operational(requests=200, errors=1, p95_latency_seconds=0.8, max_p95_latency_seconds=1.0,
                           max_error_rate=0.01)
    assert ok.verdict == "pass" and ok.error_rate == 0.005
    slow = check_operational(requests=200, errors=5, p95_latency_seconds=1.5, max_p95_latency_seconds=1.0,
                             max_error_rate=0.01)
    assert slow.verdict == "fail" and len(slow.reasons) == 2
    few = check_operational(requests=5, errors=5, p95_latency_seconds=9.0, max_error_rate=0.01)
    assert few.verdict == "insufficient"
    with pytest.raises(ValueError):
        check_operational(requests=1, errors=2, p95_latency_seconds=None)
    rng = random.Random(0)
    s, c = paired(rng, 650, 0.85, 0.85, 1.0)
    decision = decide(s, c)
    assert combine(decision, ok) == (decision.verdict, decision.reason)
    assert combine(decision, slow)[0] == "fail"
    assert combine(decision, few)[0] == decision.verdict


def test_the_api_defaults_are_the_benchmarked_ones():
    from slmfleet.api.modelrollout import Evaluation, Thresholds
    from slmfleet.evaluation.stats import DEFAULT_MARGIN, DEFAULT_SAMPLE_SIZE

    assert Thresholds().margin == DEFAULT_MARGIN
    assert Evaluation.model_fields["sample_size"].default == DEFAULT_SAMPLE_SIZE
