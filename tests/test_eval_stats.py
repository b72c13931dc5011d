"""Bootstrap confidence intervals and paired comparisons."""

import numpy as np
import pytest

from vlm_guard.eval.chair import chair_item_counts, chair_metric_fn
from vlm_guard.eval.pope import pope_item_counts, pope_metric_fn, pope_metrics_from_totals
from vlm_guard.eval.stats import TotalsMetric, bootstrap_ci, paired_bootstrap


def mean(values):
    return float(np.mean(values))


def bernoulli(n, rate, seed):
    rng = np.random.default_rng(seed)
    return (rng.random(n) < rate).astype(np.float64)


def test_ci_contains_point_and_is_deterministic():
    correct = bernoulli(300, 0.7, seed=1)
    point, low, high = bootstrap_ci(correct, mean, n_resamples=500, seed=3)
    assert point == pytest.approx(correct.mean())
    assert low < point < high
    assert (point, low, high) == bootstrap_ci(correct, mean, n_resamples=500, seed=3)
    assert (low, high) != bootstrap_ci(correct, mean, n_resamples=500, seed=4)[1:]


def test_ci_width_close_to_normal_approximation_and_narrows_with_n():
    widths = {}
    for n in (100, 2500):
        correct = np.array([1.0] * int(0.8 * n) + [0.0] * (n - int(0.8 * n)))
        _, low, high = bootstrap_ci(correct, mean, n_resamples=1000, seed=0)
        widths[n] = high - low
        expected = 2 * 1.96 * np.sqrt(0.8 * 0.2 / n)
        assert widths[n] == pytest.approx(expected, rel=0.15)
    assert widths[2500] < widths[100] / 3


def test_ci_list_items_and_alpha():
    items = [{"correct": 1}] * 60 + [{"correct": 0}] * 40
    metric = lambda records: sum(r["correct"] for r in records) / len(records)  # noqa: E731
    point, low95, high95 = bootstrap_ci(items, metric, n_resamples=300)
    _, low80, high80 = bootstrap_ci(items, metric, n_resamples=300, alpha=0.2)
    assert point == pytest.approx(0.6)
    assert low95 <= low80 < point < high80 <= high95


def test_constant_metric_gives_degenerate_interval():
    assert bootstrap_ci(np.ones(50), mean, n_resamples=100) == (1.0, 1.0, 1.0)


def test_totals_metric_matches_generic_path():
    """The vectorised path and a per-resample Python metric see the same indices and give the same interval."""
    rng = np.random.default_rng(0)
    labels = list(rng.choice(["yes", "no"], size=400))
    predictions = [label if rng.random() < 0.8 else ("no" if label == "yes" else "yes") for label in labels]
    counts = pope_item_counts(predictions, labels)
    fast = bootstrap_ci(counts, pope_metric_fn("f1"), n_resamples=300, seed=5)
    slow = bootstrap_ci(
        list(counts), lambda rows: float(pope_metrics_from_totals(np.sum(rows, axis=0))["f1"]), n_resamples=300, seed=5
    )
    assert fast == pytest.approx(slow, abs=1e-12)
    assert fast[1] < fast[0] < fast[2]


def test_chair_metric_bootstrap():
    records = [{"caption": "A dog and a cat.", "gt_objects": ["dog"]}] * 30 + [
        {"caption": "A dog.", "gt_objects": ["dog"]}
    ] * 70
    counts = chair_item_counts(records)
    point, low, high = bootstrap_ci(counts, chair_metric_fn("chair_s"), n_resamples=400)
    assert point == pytest.approx(0.3)
    assert low < 0.3 < high


def test_coverage_of_95_interval():
    """Across many simulated datasets the 95% interval covers the true rate about 95% of the time."""
    true_rate, covered, trials = 0.3, 0, 200
    metric = TotalsMetric(lambda totals: totals[..., 0] / totals[..., 1], name="rate")
    rng = np.random.default_rng(123)
    for _ in range(trials):
        hits = (rng.random(200) < true_rate).astype(np.float64)
        items = np.stack([hits, np.ones_like(hits)], axis=1)  # [n, (hit, count)]
        _, low, high = bootstrap_ci(items, metric, n_resamples=300, seed=int(rng.integers(1 << 30)))
        covered += low <= true_rate <= high
    assert 0.88 <= covered / trials <= 0.99


def test_paired_flags_a_real_difference():
    n = 1000
    baseline = bernoulli(n, 0.6, seed=10)
    improved = baseline.copy()
    flip = np.flatnonzero(baseline == 0)[:150]  # method fixes 150 of the baseline's errors
    improved[flip] = 1.0
    result = paired_bootstrap(improved, baseline, mean, n_resamples=1000, seed=0)
    assert result["diff"] == pytest.approx(0.15)
    assert result["low"] > 0 and result["high"] > result["low"]
    assert result["significant"] is True
    assert result["p_value"] < 0.01
    assert result["metric_a"] == pytest.approx(improved.mean())
    assert result["n"] == n and result["n_resamples"] == 1000
    reverse = paired_bootstrap(baseline, improved, mean, n_resamples=1000, seed=0)
    assert reverse["diff"] == pytest.approx(-0.15) and reverse["high"] < 0 and reverse["significant"]


def test_paired_identical_runs_are_not_significant():
    items = bernoulli(500, 0.5, seed=2)
    result = paired_bootstrap(items, items.copy(), mean, n_resamples=500)
    assert result["diff"] == 0.0
    assert result["low"] == 0.0 and result["high"] == 0.0
    assert result["p_value"] == 1.0
    assert result["significant"] is False


def test_paired_difference_inside_noise_is_not_significant():
    n = 1000
    baseline = bernoulli(n, 0.6, seed=11)
    other = baseline.copy()
    wrong, right = np.flatnonzero(baseline == 0), np.flatnonzero(baseline == 1)
    other[wrong[:20]] = 1.0  # fixes 20 items ...
    other[right[:17]] = 0.0  # ... breaks 17: +0.3 points
    result = paired_bootstrap(other, baseline, mean, n_resamples=1000)
    assert result["diff"] == pytest.approx(0.003)
    assert result["low"] < 0 < result["high"]
    assert result["significant"] is False
    assert result["p_value"] > 0.05


def test_paired_pope_f1_vectorised():
    rng = np.random.default_rng(7)
    labels = list(rng.choice(["yes", "no"], size=3000))
    base = [label if rng.random() < 0.80 else ("no" if label == "yes" else "yes") for label in labels]
    better = [label if rng.random() < 0.90 else ("no" if label == "yes" else "yes") for label in labels]
    result = paired_bootstrap(
        pope_item_counts(better, labels), pope_item_counts(base, labels), pope_metric_fn("f1"), n_resamples=1000
    )
    assert result["significant"] and result["diff"] > 0.05


def test_argument_errors():
    with pytest.raises(ValueError, match="items is empty"):
        bootstrap_ci([], mean)
    with pytest.raises(ValueError, match="alpha must be in"):
        bootstrap_ci([1.0, 0.0], mean, alpha=1.5)
    with pytest.raises(ValueError, match="n_resamples must be a positive int"):
        bootstrap_ci([1.0, 0.0], mean, n_resamples=0)
    with pytest.raises(ValueError, match="aligned item by item, got 3 and 2"):
        paired_bootstrap([1, 0, 1], [1, 0], mean)
    with pytest.raises(ValueError, match=r"shape \[n_items, n_counts\]"):
        bootstrap_ci(np.zeros((4, 2, 2)), TotalsMetric(lambda t: t[..., 0]))
