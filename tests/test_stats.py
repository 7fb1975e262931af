import numpy as np
import pytest
from scipy import stats as sps

from moe_prefix.analysis.stats import (
    bootstrap_ci,
    cohens_d,
    cohens_d_paired,
    holm,
    mcnemar_exact_pvalue,
    mcnemar_test,
    paired_permutation_test,
    smallest_sign_flip_p,
    spearman_with_ci,
)

N_NULL = 200  # null datasets for the calibration checks


def _binomial_band(n: int, p: float, tail: float = 0.001) -> tuple[int, int]:
    """Counts a Binomial(n, p) stays within with probability 1 - 2 * tail."""
    return int(sps.binom.ppf(tail, n, p)), int(sps.binom.isf(tail, n, p))


def _assert_uniform_null(pvalues: np.ndarray) -> None:
    low, high = _binomial_band(pvalues.size, 0.05)
    assert low <= np.count_nonzero(pvalues <= 0.05) <= high
    assert sps.kstest(pvalues, "uniform").pvalue > 0.01


def test_bootstrap_ci_covers_true_mean():
    rng = np.random.default_rng(0)
    covered = 0
    for seed in range(N_NULL):
        sample = rng.normal(loc=1.5, scale=2.0, size=30)
        _, low, high = bootstrap_ci(sample, n_resamples=1000, seed=seed)
        covered += low <= 1.5 <= high
    # The percentile interval undercovers a little at n = 30 (~93-94 %); coarse check around 95 %.
    assert 0.88 <= covered / N_NULL <= 0.99


def test_bootstrap_ci_columnwise_matches_separate_calls_and_is_seeded():
    rng = np.random.default_rng(1)
    values = rng.normal(size=(40, 3))
    est, low, high = bootstrap_ci(values, np.median, n_resamples=500, seed=3)
    assert est.shape == low.shape == high.shape == (3,)
    np.testing.assert_allclose(est, np.median(values, axis=0))
    assert np.all(low <= est) and np.all(est <= high)
    again = bootstrap_ci(values, np.median, n_resamples=500, seed=3)
    np.testing.assert_array_equal(low, again.low)
    # Rows are resampled jointly: a column that is another column plus 1 gets the interval shifted by 1.
    shifted = bootstrap_ci(np.c_[values[:, 0], values[:, 0] + 1], n_resamples=500, seed=3)
    np.testing.assert_allclose(shifted.low[1] - shifted.low[0], 1.0)
    np.testing.assert_allclose(shifted.high[1] - shifted.high[0], 1.0)


def test_bootstrap_ci_fills_every_resample_across_chunks(monkeypatch):
    import moe_prefix.analysis.stats as stats_module

    values = np.arange(20.0)
    monkeypatch.setattr(stats_module, "_CHUNK_ELEMENTS", 7 * 20)  # 7 resamples per chunk
    est, low, high = bootstrap_ci(values, n_resamples=101, seed=0)
    assert est == pytest.approx(9.5) and low < 9.5 < high


@pytest.mark.parametrize("alternative", ["two-sided", "greater", "less"])
def test_paired_permutation_exact_matches_scipy(alternative):
    rng = np.random.default_rng(2)
    a = rng.normal(size=10)
    b = a + rng.normal(loc=0.4, size=10)
    ours = paired_permutation_test(a, b, alternative=alternative)  # n <= 16: exact enumeration
    ref = sps.permutation_test(
        (a, b),
        lambda x, y, axis: np.mean(x - y, axis=axis),
        permutation_type="samples",
        vectorized=True,
        n_resamples=np.inf,
        alternative=alternative,
    ).pvalue
    assert ours == pytest.approx(ref, rel=1e-12)


def test_paired_permutation_random_approximates_exact():
    rng = np.random.default_rng(3)
    a = rng.normal(size=12)
    b = a + rng.normal(loc=0.5, size=12)
    exact = paired_permutation_test(a, b, exact=True)
    approx = paired_permutation_test(a, b, n_permutations=20_000, seed=1, exact=False)
    assert approx == pytest.approx(exact, abs=0.01)  # Monte Carlo sd is about 0.003 here


def test_paired_permutation_pvalue_never_zero_and_detects_shift():
    rng = np.random.default_rng(4)
    a = rng.normal(loc=3.0, size=40)
    b = rng.normal(size=40)
    p = paired_permutation_test(a, b, n_permutations=999, seed=0)
    assert p == pytest.approx(1 / 1000)
    assert paired_permutation_test(a, b, n_permutations=999, seed=0, alternative="less") > 0.99


@pytest.mark.parametrize("n", [3, 8, 16, 24])  # exact up to 16; beyond, no draw of seed 0 is as extreme
def test_smallest_sign_flip_p_is_the_test_on_one_signed_differences(n):
    a = np.linspace(1.0, 2.0, n)
    assert paired_permutation_test(a, np.zeros(n)) == pytest.approx(smallest_sign_flip_p(n), rel=1e-12)
    assert paired_permutation_test(np.zeros(n), a) == pytest.approx(smallest_sign_flip_p(n), rel=1e-12)


@pytest.mark.parametrize("n", [10, 20])  # exact enumeration and random sign flips
def test_paired_permutation_uniform_under_null(n):
    rng = np.random.default_rng(5)
    pvalues = np.array(
        [
            paired_permutation_test(rng.normal(size=n), rng.normal(size=n), n_permutations=200, seed=s)
            for s in range(N_NULL)
        ]
    )
    _assert_uniform_null(pvalues)


def test_holm_hand_example():
    # p = [0.01, 0.04, 0.03, 0.005], m = 4. Sorted: 0.005, 0.01, 0.03, 0.04 with multipliers 4, 3, 2, 1:
    # 0.02, 0.03, 0.06, 0.04; running max: 0.02, 0.03, 0.06, 0.06. Back in input order:
    # 0.01 -> 0.03, 0.04 -> 0.06, 0.03 -> 0.06, 0.005 -> 0.02.
    adjusted = holm([0.01, 0.04, 0.03, 0.005])
    np.testing.assert_allclose(adjusted, [0.03, 0.06, 0.06, 0.02])


# discordant counts (arm right only, reference right only): none, one-sided, balanced, lopsided, large
MCNEMAR_CASES = [(0, 1), (1, 0), (0, 5), (1, 9), (3, 7), (10, 2), (5, 5), (6, 7), (0, 25), (40, 60), (1500, 1300)]


@pytest.mark.parametrize(("only_a", "only_b"), MCNEMAR_CASES)
def test_mcnemar_exact_matches_scipy_binomtest(only_a, only_b):
    expected = sps.binomtest(only_a, only_a + only_b, 0.5, alternative="two-sided").pvalue
    assert mcnemar_exact_pvalue(only_a, only_b) == pytest.approx(expected, rel=1e-12, abs=0)


def test_mcnemar_exact_hand_values():
    assert mcnemar_exact_pvalue(0, 5) == 2 / 2**5  # only the two all-one-way outcomes are as extreme
    assert mcnemar_exact_pvalue(1, 9) == 2 * (1 + 10) / 2**10
    assert mcnemar_exact_pvalue(5, 5) == mcnemar_exact_pvalue(0, 0) == 1.0  # capped; no discordant pair
    assert mcnemar_exact_pvalue(7, 3) == mcnemar_exact_pvalue(3, 7)  # two-sided: symmetric
    with pytest.raises(ValueError, match="non-negative integers"):
        mcnemar_exact_pvalue(-1, 3)


@pytest.mark.parametrize(("only_a", "only_b"), [c for c in MCNEMAR_CASES if sum(c) > 0])
def test_mcnemar_exact_matches_statsmodels(only_a, only_b):
    contingency = pytest.importorskip("statsmodels.stats.contingency_tables")
    table = [[11, only_a], [only_b, 4]]  # concordant cells do not enter the test
    expected = contingency.mcnemar(table, exact=True).pvalue
    assert mcnemar_exact_pvalue(only_a, only_b) == pytest.approx(expected, rel=1e-12, abs=0)


def test_mcnemar_test_counts_discordant_pairs():
    a = np.array([1, 1, 1, 0, 0, 1, 0, 1], dtype=bool)
    b = np.array([1, 0, 0, 0, 1, 1, 0, 0], dtype=bool)
    result = mcnemar_test(a, b)
    assert (result.only_a, result.only_b) == (3, 1)
    assert result.pvalue == pytest.approx(sps.binomtest(3, 4, 0.5).pvalue)
    with pytest.raises(ValueError, match="equal length"):
        mcnemar_test(a, b[:-1])


def test_holm_monotone_capped_and_shape_preserving():
    rng = np.random.default_rng(6)
    p = rng.uniform(size=(4, 5)) ** 2
    adjusted = holm(p)
    assert adjusted.shape == p.shape
    assert np.all(adjusted >= p) and np.all(adjusted <= 1.0)
    order = np.argsort(p.ravel())
    assert np.all(np.diff(adjusted.ravel()[order]) >= 0)
    np.testing.assert_allclose(holm([0.5, 0.6]), [1.0, 1.0])
    with pytest.raises(ValueError):
        holm([0.1, np.nan])


def test_cohens_d_hand_examples():
    # Means 3 and 6, both variances 2.5: d = -3 / sqrt(2.5).
    assert cohens_d([1, 2, 3, 4, 5], [4, 5, 6, 7, 8]) == pytest.approx(-3 / np.sqrt(2.5))
    # Unequal sizes: pooled variance ((3 - 1) * 1 + (2 - 1) * 0.5) / 3 = 2.5 / 3.
    assert cohens_d([1, 2, 3], [0, 1]) == pytest.approx(1.5 / np.sqrt(2.5 / 3))
    # Differences [1, 2, 3]: mean 2, sd 1.
    assert cohens_d_paired([2, 4, 6], [1, 2, 3]) == pytest.approx(2.0)


def test_spearman_monotone_transform_is_one():
    rng = np.random.default_rng(8)
    x = rng.normal(size=30)
    rho, low, high = spearman_with_ci(x, np.exp(3 * x) + x**3, n_resamples=500, seed=0)
    assert rho == pytest.approx(1.0) and low == pytest.approx(1.0) and high == pytest.approx(1.0)
    rho, _, _ = spearman_with_ci(x, -x, n_resamples=100, seed=0)
    assert rho == pytest.approx(-1.0)


def test_spearman_matches_scipy_with_ties_and_ci_brackets():
    rng = np.random.default_rng(9)
    x = rng.integers(0, 6, size=60)
    y = x + rng.integers(0, 4, size=60)
    rho, low, high = spearman_with_ci(x, y, n_resamples=2000, seed=1)
    assert rho == pytest.approx(sps.spearmanr(x, y).statistic)
    assert low < rho < high
    assert spearman_with_ci(x, y, n_resamples=2000, seed=1) == (rho, low, high)
