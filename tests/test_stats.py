"""exp_1.stats: interval coverage by Monte Carlo, paired comparisons against direct computations, calibration, bins."""

import math

import numpy as np
import pytest

from imdb_grad_accum.stats import (
    accuracy_by_length,
    bootstrap_interval,
    confusion,
    expected_calibration_error,
    holm_adjust,
    majority_correct,
    mcnemar_exact,
    paired_bootstrap_difference,
    seed_interval,
)


@pytest.mark.slow
def test_bootstrap_interval_covers_true_accuracy_about_95_percent():
    """Over 400 synthetic test sets, the 95% bootstrap interval covers the true accuracy 92-98% of the time."""
    # p_true is off the k/n lattice on purpose: with p_true = 0.88 an interval endpoint lands exactly on it in ~2% of
    # repetitions (endpoints are resampled means, multiples of 1/n), which inflates inclusive coverage to ~98%.
    p_true, n, repetitions = 0.8805, 1000, 400
    rng = np.random.default_rng(1234)
    covered = 0
    for repetition in range(repetitions):
        correct = rng.random(n) < p_true
        lower, upper = bootstrap_interval(correct, resamples=2000, seed=repetition)
        covered += lower <= p_true <= upper
    # The coverage estimate has binomial sd sqrt(0.95 * 0.05 / 400) ≈ 1.1 points, so [0.92, 0.98] is about ±2.7 sd
    # around 95%; a 90% interval (a halved tail) or a far too narrow/wide one falls outside.
    assert 0.92 <= covered / repetitions <= 0.98


def test_bootstrap_interval_is_deterministic_and_brackets_the_mean():
    """Same seed gives the same interval; the interval contains the observed accuracy and narrows with a lower level."""
    correct = np.random.default_rng(7).random(500) < 0.7
    lower, upper = bootstrap_interval(correct, resamples=3000, seed=3)
    assert (lower, upper) == bootstrap_interval(correct, resamples=3000, seed=3)
    assert lower < correct.mean() < upper
    narrow_lower, narrow_upper = bootstrap_interval(correct, resamples=3000, seed=3, level=0.5)
    assert lower < narrow_lower < narrow_upper < upper


def test_seed_interval_covers_true_mean_about_95_percent():
    """With 3 normal draws per repetition, the t interval covers the true mean 93-97% of 4000 repetitions."""
    true_mean, repetitions = 0.9, 4000
    draws = np.random.default_rng(99).normal(true_mean, 0.01, size=(repetitions, 3))
    intervals = np.array([seed_interval(row) for row in draws])
    coverage = np.mean((intervals[:, 0] <= true_mean) & (true_mean <= intervals[:, 1]))
    # Binomial sd of the estimate is sqrt(0.95 * 0.05 / 4000) ≈ 0.34 points, so ±2 points is about ±6 sd. A normal
    # quantile (1.96) instead of t_{0.975, 2} = 4.30 would cover only about 80%.
    assert 0.93 <= coverage <= 0.97


def test_seed_interval_matches_formula_and_needs_two_seeds():
    """seed_interval equals mean ± t·sd/sqrt(n) for a hand-checked case and rejects a single seed."""
    lower, upper = seed_interval([0.90, 0.91, 0.92])
    # mean 0.91, sd 0.01, t_{0.975, 2} = 4.302653
    assert lower == pytest.approx(0.91 - 4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    assert upper == pytest.approx(0.91 + 4.302653 * 0.01 / math.sqrt(3), abs=1e-6)
    with pytest.raises(ValueError):
        seed_interval([0.9])


def test_paired_bootstrap_of_a_run_with_itself_is_exactly_zero():
    """Comparing a configuration with itself gives exactly (0, 0, 0), for one seed and for several."""
    rng = np.random.default_rng(5)
    one_seed = rng.random(800) < 0.85
    three_seeds = rng.random((3, 800)) < 0.85
    assert paired_bootstrap_difference(one_seed, one_seed) == (0.0, 0.0, 0.0)
    assert paired_bootstrap_difference(three_seeds, three_seeds) == (0.0, 0.0, 0.0)


def test_paired_bootstrap_detects_a_known_shift():
    """Flipping 30 of 1000 correct reviews to wrong gives a difference of exactly 0.03 with an interval excluding 0."""
    rng = np.random.default_rng(11)
    correct_a = rng.random(1000) < 0.88
    correct_b = correct_a.copy()
    correct_b[np.flatnonzero(correct_a)[:30]] = False
    difference, lower, upper = paired_bootstrap_difference(correct_a, correct_b, seed=2)
    assert difference == 0.03
    # Pairing makes the per-review difference 0 or 1 with 30 ones: the interval is about 0.03 ± 0.011.
    assert 0.0 < lower < 0.03 < upper < 0.05


def test_paired_bootstrap_with_seeds_is_wider_than_one_seed():
    """Resampling seeds widens the interval when seeds disagree, and the point estimate is the mean over seeds."""
    rng = np.random.default_rng(21)
    n = 1000
    # Each seed of a makes its own independent errors, with accuracies 0.84, 0.88 and 0.92: real seed variation.
    correct_a = rng.random((3, n)) < np.array([[0.84], [0.88], [0.92]])
    correct_b = rng.random(n) < 0.85
    difference, lower, upper = paired_bootstrap_difference(correct_a, correct_b, seed=4)
    assert difference == pytest.approx(correct_a.mean() - correct_b.mean())
    _, single_lower, single_upper = paired_bootstrap_difference(correct_a.mean(axis=0), correct_b, seed=4)
    assert upper - lower > single_upper - single_lower
    assert lower < difference < upper


def test_majority_correct_uses_first_seed_on_ties():
    """Majority over seeds, with the first seed deciding ties among an even number of seeds."""
    three_seeds = np.array([[1, 0, 1, 0], [1, 1, 0, 0], [0, 1, 0, 1]])
    assert majority_correct(three_seeds).tolist() == [True, True, False, False]
    two_seeds = np.array([[1, 0, 1, 0], [1, 1, 0, 0]])
    assert majority_correct(two_seeds).tolist() == [True, False, True, False]
    assert majority_correct(np.array([1, 0, 1])).tolist() == [True, False, True]


def _mcnemar_by_hand(only_a_right: int, only_b_right: int) -> float:
    """Two-sided exact McNemar straight from binomial coefficients of the discordant pairs."""
    discordant = only_a_right + only_b_right
    if discordant == 0:
        return 1.0
    tail = sum(math.comb(discordant, k) for k in range(min(only_a_right, only_b_right) + 1)) / 2**discordant
    return min(1.0, 2 * tail)


def _paired_arrays(both_right: int, only_a_right: int, only_b_right: int, both_wrong: int):
    a = [1] * both_right + [1] * only_a_right + [0] * only_b_right + [0] * both_wrong
    b = [1] * both_right + [0] * only_a_right + [1] * only_b_right + [0] * both_wrong
    return np.array(a, dtype=bool), np.array(b, dtype=bool)


@pytest.mark.parametrize(
    "both_right, only_a_right, only_b_right, both_wrong",
    [(50, 0, 0, 10), (40, 12, 3, 5), (40, 3, 12, 5), (10, 7, 7, 2), (100, 25, 0, 0), (0, 1, 0, 0)],
)
def test_mcnemar_matches_binomial_sums(both_right, only_a_right, only_b_right, both_wrong):
    """mcnemar_exact equals the exact binomial computation on the discordant pairs (incl. none and asymmetric ones)."""
    a, b = _paired_arrays(both_right, only_a_right, only_b_right, both_wrong)
    assert mcnemar_exact(a, b) == pytest.approx(_mcnemar_by_hand(only_a_right, only_b_right), rel=1e-12)


def test_mcnemar_known_values_and_self_comparison():
    """Hand values: b=12, c=3 gives p = 2·(1+15+105+455)/2^15 ≈ 0.0352; a run against itself gives 1."""
    a, b = _paired_arrays(40, 12, 3, 5)
    assert mcnemar_exact(a, b) == pytest.approx(2 * 576 / 2**15, rel=1e-12)
    assert mcnemar_exact(a, a) == 1.0


def test_holm_adjust_hand_checked():
    """Holm on [0.01, 0.04, 0.03, 0.005]: sorted p times (4, 3, 2, 1), running max, back in input order."""
    # sorted: 0.005·4 = 0.02, 0.01·3 = 0.03, 0.03·2 = 0.06, 0.04·1 = 0.04 -> max keeps it at 0.06.
    assert holm_adjust([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm_adjust([0.5, 0.6]) == pytest.approx([1.0, 1.0])  # capped at 1
    assert holm_adjust([0.2]) == pytest.approx([0.2])


def test_ece_near_zero_for_calibrated_predictions():
    """Labels drawn with P(y=1) = p: ECE below 0.02 for n = 20000, and bins add up to n."""
    rng = np.random.default_rng(8)
    prob_positive = rng.random(20000)
    labels = (rng.random(20000) < prob_positive).astype(int)
    ece, reliability = expected_calibration_error(prob_positive, labels)
    # About 2000 reviews per bin: accuracy noise sd ≈ 0.01 per bin, so the ECE is around 0.01, well below 0.02.
    assert ece < 0.02
    assert sum(cell["count"] for cell in reliability) == 20000
    assert len(reliability) == 10
    assert all(cell["low"] <= cell["confidence"] <= cell["high"] for cell in reliability)


def test_ece_near_one_for_confident_wrong_predictions():
    """Always 99.9% confident and always wrong: one bin, accuracy 0, ECE = 0.999."""
    labels = np.array([0, 1] * 50)
    prob_positive = np.where(labels == 1, 0.001, 0.999)
    ece, reliability = expected_calibration_error(prob_positive, labels)
    assert ece == pytest.approx(0.999)
    assert reliability == [
        {"low": pytest.approx(0.95), "high": 1.0, "count": 100, "accuracy": 0.0, "confidence": pytest.approx(0.999)}
    ]


def test_ece_bins_edges_and_certain_predictions():
    """p = 0.5 predicts positive with confidence 0.5 (first bin); p = 0 or 1 lands in the last bin."""
    ece, reliability = expected_calibration_error(np.array([0.5, 1.0, 0.0]), np.array([1, 1, 1]), bins=2)
    assert [(cell["low"], cell["high"], cell["count"]) for cell in reliability] == [(0.5, 0.75, 1), (0.75, 1.0, 2)]
    # bin 1: accuracy 1 vs confidence 0.5; bin 2: accuracy 0.5 vs confidence 1.0
    assert ece == pytest.approx(1 / 3 * 0.5 + 2 / 3 * 0.5)


def test_accuracy_by_length_bins_and_truncation_split():
    """Tokens split into [0,128), [128,256) and an open >=256 bin, each split by truncation, empty cells skipped."""
    correct = np.array([1, 0, 1, 1, 0, 1, 0])
    tokens = np.array([10, 127, 128, 255, 256, 300, 512])
    truncated = np.array([False, False, False, False, False, True, True])
    assert accuracy_by_length(correct, tokens, truncated, [0, 128, 256]) == [
        {"bin": "0-127", "truncated": False, "count": 2, "accuracy": 0.5},
        {"bin": "128-255", "truncated": False, "count": 2, "accuracy": 1.0},
        {"bin": ">=256", "truncated": False, "count": 1, "accuracy": 0.0},
        {"bin": ">=256", "truncated": True, "count": 2, "accuracy": 0.5},
    ]


def test_accuracy_by_length_without_open_bin():
    """When every review is below the last edge, no open-ended bin is added and empty bins are skipped."""
    cells = accuracy_by_length(np.array([1, 0]), np.array([5, 300]), np.array([False, True]), [0, 100, 200, 512])
    assert cells == [
        {"bin": "0-99", "truncated": False, "count": 1, "accuracy": 1.0},
        {"bin": "200-511", "truncated": True, "count": 1, "accuracy": 0.0},
    ]


def test_confusion_counts():
    """Rows are true labels, columns predictions: [[TN, FP], [FN, TP]]."""
    labels = np.array([0, 0, 0, 1, 1, 1, 1])
    predicted = np.array([0, 1, 1, 1, 1, 0, 1])
    assert confusion(labels, predicted).tolist() == [[1, 2], [1, 3]]
