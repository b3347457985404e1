"""Statistics for comparing runs: bootstrap and seed intervals, paired tests, calibration and per-length accuracy.

What numpy and scipy.stats lack: the paired bootstrap over reviews and seeds, the majority vote over seeds, Holm's
correction and the calibration bins. Every random function takes an explicit `seed`: the same inputs, the same numbers.
"""

import numpy as np
from scipy import stats

CHUNK_ELEMENTS = 6_000_000  # of one (resamples, n) index matrix: int64 indices plus gathered values near 100 MB


def _chunks(resamples: int, n: int) -> list[int]:
    chunk = max(1, CHUNK_ELEMENTS // n)
    return [min(chunk, resamples - start) for start in range(0, resamples, chunk)]


def _interval(replicates: np.ndarray, level: float) -> tuple[float, float]:
    lower, upper = np.quantile(replicates, [(1.0 - level) / 2.0, (1.0 + level) / 2.0])
    return float(lower), float(upper)


def _binary(values, name: str) -> np.ndarray:
    array = np.asarray(values)
    if not np.isin(array, (0, 1)).all():
        raise ValueError(f"{name} must contain only 0/1 (or booleans)")
    return array.astype(bool)


def bootstrap_interval(correct, resamples: int = 10000, seed: int = 0, level: float = 0.95) -> tuple[float, float]:
    """Percentile bootstrap interval of the mean of per-review correctness, resampling reviews with replacement."""
    values = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    means = [values[rng.integers(0, values.size, size=(chunk, values.size))].mean(axis=1)
             for chunk in _chunks(resamples, values.size)]
    return _interval(np.concatenate(means), level)


def seed_interval(values, level: float = 0.95) -> tuple[float, float]:
    """Student-t interval of the mean over seeds: mean ± t_{(1+level)/2, n-1} · sd / sqrt(n), sd with ddof=1."""
    sample = np.asarray(values, dtype=np.float64)
    if sample.ndim != 1 or sample.size < 2:
        raise ValueError(f"seed_interval needs a 1-D list of at least 2 values, got shape {sample.shape}")
    if sample.std() == 0:
        return float(sample.mean()), float(sample.mean())
    low, high = stats.t.interval(level, sample.size - 1, loc=sample.mean(), scale=stats.sem(sample))
    return float(low), float(high)


def paired_bootstrap_difference(correct_a, correct_b, resamples: int = 10000, seed: int = 0,
                                level: float = 0.95) -> tuple[float, float, float]:
    """Mean accuracy a - b of (seeds, n) correctness, column j the same review in both, and its interval. Each replicate
    resamples the reviews with the same indices for a and b, and each side's seeds, when it has several, so the
    interval covers both test-set and seed variation."""
    a, b = (np.atleast_2d(np.asarray(x, dtype=np.float64)) for x in (correct_a, correct_b))
    if np.array_equal(a, b):  # the same runs on the same reviews: every replicate's difference is zero
        return 0.0, 0.0, 0.0
    difference = float((a.mean(axis=0) - b.mean(axis=0)).mean())  # exact for one seed each: a count over n
    rng = np.random.default_rng(seed)
    n = a.shape[1]

    def accuracy(correct: np.ndarray, reviews: np.ndarray) -> np.ndarray:
        per_seed = np.stack([row[reviews].mean(axis=1) for row in correct], axis=1)  # (chunk, seeds)
        if correct.shape[0] == 1:
            return per_seed[:, 0]
        seeds = rng.integers(0, correct.shape[0], size=per_seed.shape)
        return np.take_along_axis(per_seed, seeds, axis=1).mean(axis=1)

    replicates = []
    for chunk in _chunks(resamples, n):
        reviews = rng.integers(0, n, size=(chunk, n))
        replicates.append(accuracy(a, reviews) - accuracy(b, reviews))
    return (difference, *_interval(np.concatenate(replicates), level))


def majority_correct(correct) -> np.ndarray:
    """Per-review majority vote over (seeds, n) correctness; on a tie the first seed decides."""
    votes = np.atleast_2d(_binary(correct, "correct"))
    right = votes.sum(axis=0)
    return np.where(2 * right == votes.shape[0], votes[0], 2 * right > votes.shape[0])


def mcnemar_exact(correct_a, correct_b) -> float:
    """Exact two-sided McNemar p-value: a binomial test of the reviews only a got right against those only b did."""
    a, b = _binary(correct_a, "correct_a"), _binary(correct_b, "correct_b")
    only_a, only_b = int(np.sum(a & ~b)), int(np.sum(~a & b))
    return 1.0 if only_a + only_b == 0 else float(stats.binomtest(min(only_a, only_b), only_a + only_b, 0.5).pvalue)


def holm_adjust(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values, in input order."""
    raw = np.asarray(p_values, dtype=np.float64)
    order = np.argsort(raw, kind="stable")
    scaled = np.maximum.accumulate((raw.size - np.arange(raw.size)) * raw[order])  # the i-th smallest x (m - i)
    adjusted = np.empty(raw.size)
    adjusted[order] = np.minimum(scaled, 1.0)
    return adjusted.tolist()


def expected_calibration_error(prob_positive, labels, bins: int = 10) -> tuple[float, list[dict]]:
    """Expected calibration error, and the non-empty bins of confidence max(p, 1 - p) in [0.5, 1] for a reliability
    diagram. ECE = Σ (count / n) · |accuracy - mean confidence|."""
    probabilities, truth = np.asarray(prob_positive, dtype=np.float64), _binary(labels, "labels")
    if not ((probabilities >= 0) & (probabilities <= 1)).all():
        raise ValueError("prob_positive must lie in [0, 1]")
    predicted = probabilities >= 0.5
    confidence = np.where(predicted, probabilities, 1.0 - probabilities)
    correct = predicted == truth
    edges = np.linspace(0.5, 1.0, bins + 1)
    bin_of = np.minimum(np.searchsorted(edges, confidence, side="right") - 1, bins - 1)
    reliability = [{"low": float(edges[i]), "high": float(edges[i + 1]), "count": int(members.sum()),
                    "accuracy": float(correct[members].mean()), "confidence": float(confidence[members].mean())}
                   for i in range(bins) if (members := bin_of == i).any()]
    ece = sum(cell["count"] / probabilities.size * abs(cell["accuracy"] - cell["confidence"]) for cell in reliability)
    return float(ece), reliability


def accuracy_by_length(correct, tokens, truncated, edges: list[int]) -> list[dict]:
    """Accuracy per token-count bin [edges[i], edges[i+1]) ("128-255", then ">=<last edge>" when some review reaches
    it), split by whether the review was truncated; empty cells are left out."""
    right, lengths, cut = np.asarray(correct, dtype=np.float64), np.asarray(tokens), _binary(truncated, "truncated")
    if lengths.size and lengths.min() < edges[0]:
        raise ValueError(f"a review has {lengths.min()} tokens, below the first edge {edges[0]}")
    bins = [(f"{low}-{high - 1}", (lengths >= low) & (lengths < high)) for low, high in zip(edges, edges[1:])]
    if lengths.size and lengths.max() >= edges[-1]:
        bins.append((f">={edges[-1]}", lengths >= edges[-1]))
    return [{"bin": label, "truncated": is_cut, "count": int(members.sum()), "accuracy": float(right[members].mean())}
            for label, in_bin in bins for is_cut in (False, True)
            if (members := in_bin & (cut == is_cut)).any()]


def confusion(labels, predicted) -> np.ndarray:
    """2x2 confusion counts: rows are the true label (0 negative, 1 positive), columns the predicted label."""
    truth, guess = _binary(labels, "labels"), _binary(predicted, "predicted")
    return np.bincount(2 * truth.ravel().astype(int) + guess.ravel().astype(int), minlength=4).reshape(2, 2)
