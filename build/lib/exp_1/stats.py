"""Statistics for comparing runs: bootstrap and seed intervals, paired tests, calibration and per-length accuracy.

Pure numpy/scipy. Every random function takes an explicit `seed`, so the same inputs always give the same numbers.
"""

from __future__ import annotations

import numpy as np
from scipy import stats

# Elements of one (resamples, n) index matrix; int64 indices plus gathered values stay near 100 MB per chunk.
_CHUNK_ELEMENTS = 6_000_000


def _check_level(level: float) -> None:
    if not 0.0 < level < 1.0:
        raise ValueError(f"level must be strictly between 0 and 1, got {level}")


def _check_resamples(resamples: int) -> None:
    if resamples < 1:
        raise ValueError(f"resamples must be at least 1, got {resamples}")


def _chunk_sizes(resamples: int, n: int) -> list[int]:
    """Split `resamples` into chunks whose (chunk, n) index matrices fit the memory budget."""
    chunk = max(1, _CHUNK_ELEMENTS // n)
    return [min(chunk, resamples - start) for start in range(0, resamples, chunk)]


def _percentile_interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    lower, upper = np.quantile(replicates, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lower), float(upper)


def _as_seed_matrix(correct: np.ndarray, name: str) -> np.ndarray:
    """A 1-D array is one seed: return shape (seeds, n) as float64."""
    matrix = np.atleast_2d(np.asarray(correct, dtype=np.float64))
    if matrix.ndim != 2 or matrix.shape[1] == 0:
        raise ValueError(f"{name} must have shape (n,) or (seeds, n) with n >= 1, got {np.shape(correct)}")
    return matrix


def _as_binary(values: np.ndarray, name: str) -> np.ndarray:
    array = np.asarray(values)
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0/1 (or booleans)")
    return array.astype(bool)


def bootstrap_interval(
    correct: np.ndarray, resamples: int = 10000, seed: int = 0, level: float = 0.95
) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-review correctness, resampling reviews with replacement."""
    _check_level(level)
    _check_resamples(resamples)
    values = np.asarray(correct, dtype=np.float64)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(f"correct must be a non-empty 1-D array, got shape {values.shape}")
    rng = np.random.default_rng(seed)
    n = values.size
    means = np.concatenate(
        [values[rng.integers(0, n, size=(chunk, n))].mean(axis=1) for chunk in _chunk_sizes(resamples, n)]
    )
    return _percentile_interval(means, level)


def seed_interval(values: list[float] | np.ndarray, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean over seeds: mean ± t_{(1+level)/2, n-1} · sd / sqrt(n), sd with ddof=1."""
    _check_level(level)
    sample = np.asarray(values, dtype=np.float64)
    if sample.ndim != 1 or sample.size < 2:
        raise ValueError(f"seed_interval needs a 1-D list of at least 2 values, got shape {sample.shape}")
    n = sample.size
    mean = sample.mean()
    half_width = stats.t.ppf((1.0 + level) / 2.0, n - 1) * sample.std(ddof=1) / np.sqrt(n)
    return float(mean - half_width), float(mean + half_width)


def _resampled_accuracy(
    correct: np.ndarray, review_indices: np.ndarray, rng: np.random.Generator
) -> np.ndarray:
    """Accuracy of each replicate: reviews resampled by `review_indices`, seeds resampled when there are 2 or more."""
    per_seed = np.stack([row[review_indices].mean(axis=1) for row in correct], axis=1)  # (chunk, seeds)
    seeds = correct.shape[0]
    if seeds == 1:
        return per_seed[:, 0]
    seed_indices = rng.integers(0, seeds, size=(per_seed.shape[0], seeds))
    return np.take_along_axis(per_seed, seed_indices, axis=1).mean(axis=1)


def paired_bootstrap_difference(
    correct_a: np.ndarray,
    correct_b: np.ndarray,
    resamples: int = 10000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float, float]:
    """Difference of mean accuracy a - b with a paired bootstrap interval: (difference, lower, upper).

    `correct_a` is (seeds_a, n) and `correct_b` is (seeds_b, n), a 1-D array being one seed; column j is the same
    test review in both. Each replicate resamples the n reviews with replacement using the same indices for a and
    b (paired), and resamples each side's seeds with replacement, independently, when it has 2 or more, so the
    interval covers both test-set and seed variation. With one seed each this is the plain paired bootstrap.
    """
    _check_level(level)
    _check_resamples(resamples)
    a = _as_seed_matrix(correct_a, "correct_a")
    b = _as_seed_matrix(correct_b, "correct_b")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"a and b must cover the same reviews: {a.shape[1]} columns vs {b.shape[1]}")
    if np.array_equal(a, b):
        # The same runs on the same reviews: every replicate's difference is zero, seed resampling included.
        return 0.0, 0.0, 0.0
    # Mean of per-review differences: exact for one seed each (an integer count divided by n).
    difference = float((a.mean(axis=0) - b.mean(axis=0)).mean())
    rng = np.random.default_rng(seed)
    n = a.shape[1]
    replicates = []
    for chunk in _chunk_sizes(resamples, n):
        review_indices = rng.integers(0, n, size=(chunk, n))
        replicates.append(
            _resampled_accuracy(a, review_indices, rng) - _resampled_accuracy(b, review_indices, rng)
        )
    lower, upper = _percentile_interval(np.concatenate(replicates), level)
    return difference, lower, upper


def majority_correct(correct: np.ndarray) -> np.ndarray:
    """Per-review majority vote over seeds, from shape (seeds, n) or (n,) to a 1-D boolean array.

    A review counts as correct when more than half of the seeds got it right. On a tie (possible only with an even
    number of seeds) the first seed decides.
    """
    votes_matrix = np.atleast_2d(_as_binary(correct, "correct"))
    seeds = votes_matrix.shape[0]
    right_votes = votes_matrix.sum(axis=0)
    return np.where(2 * right_votes == seeds, votes_matrix[0], 2 * right_votes > seeds)


def mcnemar_exact(correct_a: np.ndarray, correct_b: np.ndarray) -> float:
    """Exact two-sided McNemar p-value for paired 1-D correctness of two classifiers on the same reviews.

    b = #(a right, b wrong), c = #(a wrong, b right); p = min(1, 2 · BinomCDF(min(b, c); b + c, 1/2)), 1 when b + c = 0.
    """
    a = _as_binary(correct_a, "correct_a")
    b = _as_binary(correct_b, "correct_b")
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"correct_a and correct_b must be 1-D of equal length, got {a.shape} and {b.shape}")
    only_a_right = int(np.sum(a & ~b))
    only_b_right = int(np.sum(~a & b))
    discordant = only_a_right + only_b_right
    if discordant == 0:
        return 1.0
    return float(min(1.0, 2.0 * stats.binom.cdf(min(only_a_right, only_b_right), discordant, 0.5)))


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, returned in input order (monotone in the raw p-values, capped at 1)."""
    raw = np.asarray(p_values, dtype=np.float64)
    if raw.ndim != 1 or ((raw < 0) | (raw > 1)).any() or np.isnan(raw).any():
        raise ValueError("p_values must be a flat list of numbers in [0, 1]")
    order = np.argsort(raw, kind="stable")
    m = raw.size
    # The i-th smallest p is multiplied by (m - i); the running max keeps the adjusted values monotone.
    scaled = np.maximum.accumulate((m - np.arange(m)) * raw[order])
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(scaled, 1.0)
    return adjusted.tolist()


def expected_calibration_error(
    prob_positive: np.ndarray, labels: np.ndarray, bins: int = 10
) -> tuple[float, list[dict]]:
    """Expected calibration error of a binary classifier, plus the non-empty bins for a reliability diagram.

    The prediction is positive when p >= 0.5 and its confidence is max(p, 1 - p), so confidences lie in [0.5, 1];
    that range is cut into `bins` equal-width bins (the last one includes 1.0). ECE = Σ (count / n) · |accuracy -
    mean confidence|. Each bin is {"low", "high", "count", "accuracy", "confidence"}.
    """
    probabilities = np.asarray(prob_positive, dtype=np.float64)
    truth = _as_binary(labels, "labels")
    if probabilities.ndim != 1 or probabilities.size == 0 or probabilities.shape != truth.shape:
        raise ValueError(f"need matching non-empty 1-D arrays, got {probabilities.shape} and {truth.shape}")
    if not ((probabilities >= 0) & (probabilities <= 1)).all():
        raise ValueError("prob_positive must lie in [0, 1]")
    if bins < 1:
        raise ValueError(f"bins must be at least 1, got {bins}")
    predicted = probabilities >= 0.5
    confidence = np.where(predicted, probabilities, 1.0 - probabilities)
    correct = predicted == truth
    edges = np.linspace(0.5, 1.0, bins + 1)
    # Bin i holds [edges[i], edges[i+1]); a confidence of exactly 1.0 goes into the last bin.
    bin_of = np.minimum(np.searchsorted(edges, confidence, side="right") - 1, bins - 1)
    ece = 0.0
    reliability = []
    for i in range(bins):
        members = bin_of == i
        count = int(members.sum())
        if count == 0:
            continue
        accuracy = float(correct[members].mean())
        mean_confidence = float(confidence[members].mean())
        ece += count / probabilities.size * abs(accuracy - mean_confidence)
        reliability.append(
            {
                "low": float(edges[i]),
                "high": float(edges[i + 1]),
                "count": count,
                "accuracy": accuracy,
                "confidence": mean_confidence,
            }
        )
    return ece, reliability


def accuracy_by_length(
    correct: np.ndarray, tokens: np.ndarray, truncated: np.ndarray, edges: list[int]
) -> list[dict]:
    """Accuracy per token-count bin, split by whether the review was truncated; empty cells are left out.

    Bins are [edges[i], edges[i+1]) labelled "128-255"; when some review has at least edges[-1] tokens an extra
    open-ended bin ">=<last edge>" is added. Each cell is {"bin", "truncated", "count", "accuracy"}, in bin order,
    untruncated before truncated.
    """
    right = np.asarray(correct, dtype=np.float64)
    lengths = np.asarray(tokens)
    was_truncated = _as_binary(truncated, "truncated")
    if not (right.ndim == 1 and right.shape == lengths.shape == was_truncated.shape):
        raise ValueError("correct, tokens and truncated must be 1-D arrays of the same length")
    if len(edges) < 2 or any(low >= high for low, high in zip(edges, edges[1:])):
        raise ValueError(f"edges must be at least 2 strictly increasing token counts, got {edges}")
    if lengths.size and lengths.min() < edges[0]:
        raise ValueError(f"a review has {lengths.min()} tokens, below the first edge {edges[0]}")
    bins = [(f"{low}-{high - 1}", (lengths >= low) & (lengths < high)) for low, high in zip(edges, edges[1:])]
    if lengths.size and lengths.max() >= edges[-1]:
        bins.append((f">={edges[-1]}", lengths >= edges[-1]))
    cells = []
    for label, in_bin in bins:
        for is_truncated in (False, True):
            members = in_bin & (was_truncated == is_truncated)
            count = int(members.sum())
            if count:
                cells.append(
                    {"bin": label, "truncated": is_truncated, "count": count, "accuracy": float(right[members].mean())}
                )
    return cells


def confusion(labels: np.ndarray, predicted: np.ndarray) -> np.ndarray:
    """2x2 confusion counts: rows are the true label (0 negative, 1 positive), columns the predicted label."""
    truth = _as_binary(labels, "labels")
    guess = _as_binary(predicted, "predicted")
    if truth.shape != guess.shape:
        raise ValueError(f"labels and predicted must have the same shape, got {truth.shape} and {guess.shape}")
    return np.bincount(2 * truth.ravel().astype(int) + guess.ravel().astype(int), minlength=4).reshape(2, 2)
