"""General statistics for comparing runs: bootstrap intervals, paired permutation tests, Holm, effect sizes.

Everything is seeded (``seed`` takes an int or a ``numpy.random.Generator``) and vectorised over resamples;
resamples are drawn in chunks of at most ``_CHUNK_ELEMENTS`` array elements so memory stays bounded.

References:
- Efron & Tibshirani, *An Introduction to the Bootstrap* (1993), ch. 13: the percentile interval.
- Phipson & Smyth, "Permutation p-values should never be zero" (2010): the (count + 1) / (n + 1) estimate.
- Holm, "A simple sequentially rejective multiple test procedure" (1979).
- McNemar, "Note on the sampling error of the difference between correlated proportions" (1947); its exact
  form is the binomial test on the discordant pairs (Edwards 1948; Dietterich 1998 for comparing classifiers).

Axis key: ``n`` samples (examples, seeds, tasks), ``c`` columns (statistics computed side by side),
``r`` resamples or permutations.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any, Literal, NamedTuple

import numpy as np
from scipy.stats import rankdata

__all__ = [
    "as_numpy",
    "chunks",
    "ConfidenceInterval",
    "bootstrap_ci",
    "paired_permutation_test",
    "holm",
    "smallest_sign_flip_p",
    "McNemarResult",
    "mcnemar_exact_pvalue",
    "mcnemar_test",
    "cohens_d",
    "cohens_d_paired",
    "spearman_with_ci",
]

Alternative = Literal["two-sided", "greater", "less"]
Seed = int | np.random.Generator | None

_CHUNK_ELEMENTS = 1 << 22  # ~32 MB of float64 per chunk of resamples
_EXACT_MAX_N = 16  # sign-flip tests enumerate all 2**n patterns up to here (65,536 patterns)
_EXACT_LIMIT_N = 24  # refuse exact enumeration beyond this: 16M patterns is already slow


class ConfidenceInterval(NamedTuple):
    """A point estimate with a two-sided interval; fields are floats, or arrays for column-wise statistics."""

    estimate: Any
    low: Any
    high: Any


def as_numpy(x: Any, dtype: Any = None) -> np.ndarray:
    """Array view of a numpy array, list or torch tensor (detached, on CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor, without importing torch here
        x = x.detach().cpu()
        if dtype is not None and x.is_floating_point():
            x = x.double()  # bfloat16 has no numpy dtype
        x = x.numpy()
    return np.asarray(x, dtype=dtype)


def chunks(total: int, row_elements: int, budget: int | None = None) -> Iterator[tuple[int, int]]:
    """(start, stop) slices of ``range(total)`` whose rows of ``row_elements`` hold at most ``budget`` elements."""
    # Read the default at call time, so a caller (or test) that lowers _CHUNK_ELEMENTS is obeyed.
    budget = _CHUNK_ELEMENTS if budget is None else budget
    step = max(1, budget // max(1, row_elements))
    for start in range(0, total, step):
        yield start, min(total, start + step)


def _scalar(x: np.ndarray) -> Any:
    """Python float for 0-d results, the array otherwise."""
    return float(x) if np.ndim(x) == 0 else x


def bootstrap_ci(
    values: Any,
    stat: Callable[..., Any] = np.mean,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: Seed = 0,
) -> ConfidenceInterval:
    """Percentile bootstrap interval of ``stat`` over the rows of ``values``.

    ``values``: (n,) or (n, c). Rows are resampled with replacement, whole rows at once, so for (n, c)
    input the c columns keep their pairing (e.g. the scores of c methods on the same n tasks) and the
    statistic is computed per column. For a paired difference pass ``a - b``.

    ``stat`` must be numpy-style: ``stat(sample, axis=k)`` reduces axis k (np.mean, np.median, np.std, or
    a lambda); it is called once per chunk of resamples of shape (r, n) or (r, n, c) with ``axis=1``.

    Returns ``ConfidenceInterval(estimate, low, high)``: floats for (n,) input, arrays of shape (c,) for
    (n, c) input. ``estimate`` is ``stat`` of the original sample.
    """
    x = as_numpy(values, dtype=np.float64)
    if x.ndim not in (1, 2):
        raise ValueError(f"values must be (n,) or (n, c), got shape {x.shape}")
    n = x.shape[0]
    if n < 2:
        raise ValueError(f"need at least 2 samples to bootstrap, got {n}")
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    rng = np.random.default_rng(seed)

    estimate = np.asarray(stat(x, axis=0), dtype=np.float64)
    boot = np.empty((n_resamples, *estimate.shape))
    for start, stop in chunks(n_resamples, x.size):
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = stat(x[idx], axis=1)  # (r, n[, c]) -> (r[, c])

    alpha = 1.0 - confidence
    low, high = np.quantile(boot, [alpha / 2, 1 - alpha / 2], axis=0)
    return ConfidenceInterval(_scalar(estimate), _scalar(low), _scalar(high))


def _sign_flip_pvalue(null: np.ndarray, observed: float, scale: float, alternative: Alternative) -> int:
    """Number of null statistics at least as extreme as ``observed`` (ties count as extreme)."""
    # Sums taken in a different order differ in the last bits; treat those as ties, as scipy does.
    gamma = 100 * np.finfo(np.float64).eps * scale
    if alternative == "two-sided":
        return int(np.count_nonzero(np.abs(null) >= abs(observed) - gamma))
    if alternative == "greater":
        return int(np.count_nonzero(null >= observed - gamma))
    return int(np.count_nonzero(null <= observed + gamma))


def paired_permutation_test(
    a: Any,
    b: Any,
    n_permutations: int = 10_000,
    seed: Seed = 0,
    alternative: Alternative = "two-sided",
    exact: bool | None = None,
) -> float:
    """p-value of H0 "a and b are exchangeable within each pair", by random sign flips of d = a - b.

    ``a``, ``b``: (n,) paired measurements (e.g. accuracy of two methods on the same n seeds or tasks).
    The statistic is mean(d); under sign flips Σd² is fixed, so this gives the same p-values as the paired
    t statistic. ``alternative="greater"`` tests mean(a - b) > 0.

    ``exact=None`` enumerates all 2**n sign patterns when n <= 16 (p = count / 2**n, the observed pattern is
    one of them) and otherwise draws ``n_permutations`` random patterns with p = (count + 1) /
    (n_permutations + 1) (Phipson & Smyth 2010), which is never zero and keeps the test valid.
    """
    if alternative not in ("two-sided", "greater", "less"):
        raise ValueError(f"alternative must be 'two-sided', 'greater' or 'less', got {alternative!r}")
    a_arr = as_numpy(a, dtype=np.float64)
    b_arr = as_numpy(b, dtype=np.float64)
    if a_arr.ndim != 1 or a_arr.shape != b_arr.shape:
        raise ValueError(f"a and b must be 1-D of equal length, got {a_arr.shape} and {b_arr.shape}")
    d = a_arr - b_arr
    n = d.size
    if n == 0:
        raise ValueError("need at least one pair")
    if exact is None:
        exact = n <= _EXACT_MAX_N
    if exact and n > _EXACT_LIMIT_N:
        raise ValueError(f"exact enumeration of 2**{n} sign patterns is too slow; use exact=False")

    observed = float(d.mean())
    scale = float(np.abs(d).mean())  # the largest |mean| any sign pattern can reach
    count = 0
    if exact:
        total = 1 << n
        bits = np.arange(n)
        for start, stop in chunks(total, n):
            codes = np.arange(start, stop)[:, None]
            signs = 1.0 - 2.0 * ((codes >> bits) & 1)  # (r, n) in {+1, -1}; code 0 is the observed one
            count += _sign_flip_pvalue(signs @ d / n, observed, scale, alternative)
        return count / total

    rng = np.random.default_rng(seed)
    for start, stop in chunks(n_permutations, n):
        signs = 1.0 - 2.0 * rng.integers(0, 2, size=(stop - start, n))
        count += _sign_flip_pvalue(signs @ d / n, observed, scale, alternative)
    return (count + 1) / (n_permutations + 1)


def smallest_sign_flip_p(n: int, n_permutations: int = 10_000) -> float:
    """The smallest p the two-sided ``paired_permutation_test`` can return for n pairs, whatever the data.

    Enumerating (n <= 16), the observed sign pattern and its mirror image are always as extreme as themselves:
    2 / 2**n. Drawing patterns, (0 + 1) / (n_permutations + 1). Times the size of a Holm family, this is the
    smallest corrected p a study can report: where that is not below alpha, no result can be significant, and
    only more pairs (seeds) help.
    """
    if n < 1:
        raise ValueError(f"need at least one pair, got n={n}")
    return 2.0 / (1 << n) if n <= _EXACT_MAX_N else 1.0 / (n_permutations + 1)


def holm(pvalues: Any) -> np.ndarray:
    """Holm–Bonferroni adjusted p-values, same shape as ``pvalues``.

    With p sorted ascending, p_(1) <= ... <= p_(m), the adjusted value is
    max_{j <= i} min(1, (m - j + 1) p_(j)): step-down, monotone in the sorted order, capped at 1.
    Rejecting where adjusted <= alpha controls the family-wise error rate at alpha under any dependence.
    """
    p = as_numpy(pvalues, dtype=np.float64)
    flat = p.ravel()
    if np.isnan(flat).any() or (flat < 0).any() or (flat > 1).any():
        raise ValueError("p-values must lie in [0, 1] and not be NaN")
    m = flat.size
    order = np.argsort(flat, kind="stable")
    stepped = np.maximum.accumulate(flat[order] * (m - np.arange(m)))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted.reshape(p.shape)


class McNemarResult(NamedTuple):
    """McNemar's exact test on paired right/wrong outcomes."""

    only_a: int  # pairs that a gets right and b wrong
    only_b: int  # pairs that b gets right and a wrong
    pvalue: float  # two-sided


def mcnemar_exact_pvalue(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant counts: a binomial test of only_a in n = only_a + only_b
    trials with success probability 1/2.

    Under H0 (a and b equally often right) each discordant pair is a fair coin. The two-sided p-value sums
    the probabilities of all outcomes no more likely than the observed one; the binomial(n, 1/2) is symmetric,
    so that is min(1, 2 P(X <= min(only_a, only_b))). Concordant pairs carry no information on the difference
    and do not enter. The tail is summed in exact integers (binomial coefficients over 2**n), so it neither
    underflows nor loses precision for thousands of pairs. No discordant pair: p = 1.
    """
    if only_a < 0 or only_b < 0 or int(only_a) != only_a or int(only_b) != only_b:
        raise ValueError(f"discordant counts must be non-negative integers, got {only_a} and {only_b}")
    n, k = int(only_a) + int(only_b), int(min(only_a, only_b))
    tail, term = 0, 1  # term: C(n, i), updated in place (exact: C(n, i + 1) = C(n, i) (n - i) / (i + 1))
    for i in range(k + 1):
        tail += term
        term = term * (n - i) // (i + 1)
    return min(1.0, 2 * tail / (1 << n))  # int / int is correctly rounded even for huge integers


def mcnemar_test(a_correct: Any, b_correct: Any) -> McNemarResult:
    """McNemar's exact test of "a and b are equally often right" on paired outcomes.

    ``a_correct``, ``b_correct``: (n,) booleans, whether each of two classifiers got pair i right (the same
    example; pooled over seeds, the pairs are (seed, example)).
    """
    a = as_numpy(a_correct).astype(bool)
    b = as_numpy(b_correct).astype(bool)
    if a.ndim != 1 or a.shape != b.shape:
        raise ValueError(f"a_correct and b_correct must be 1-D of equal length, got {a.shape} and {b.shape}")
    only_a, only_b = int(np.count_nonzero(a & ~b)), int(np.count_nonzero(b & ~a))
    return McNemarResult(only_a, only_b, mcnemar_exact_pvalue(only_a, only_b))


def cohens_d_paired(a: Any, b: Any) -> float:
    """Cohen's d_z for paired samples: mean(a - b) / sd(a - b), sd with ddof=1. ``a``, ``b``: (n,)."""
    d = as_numpy(a, dtype=np.float64) - as_numpy(b, dtype=np.float64)
    if d.ndim != 1 or d.size < 2:
        raise ValueError(f"need two 1-D paired samples of length >= 2, got shape {d.shape}")
    return float(d.mean() / d.std(ddof=1))


def cohens_d(a: Any, b: Any) -> float:
    """Cohen's d for independent samples: (mean a - mean b) / pooled sd. ``a``: (n_a,), ``b``: (n_b,).

    pooled sd = sqrt(((n_a - 1) s_a² + (n_b - 1) s_b²) / (n_a + n_b - 2)), s with ddof=1.
    """
    x = as_numpy(a, dtype=np.float64).ravel()
    y = as_numpy(b, dtype=np.float64).ravel()
    if x.size < 2 or y.size < 2:
        raise ValueError("each sample needs at least 2 values")
    pooled = ((x.size - 1) * x.var(ddof=1) + (y.size - 1) * y.var(ddof=1)) / (x.size + y.size - 2)
    return float((x.mean() - y.mean()) / np.sqrt(pooled))


def _rowwise_pearson(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Pearson correlation of each row pair: (r, n), (r, n) -> (r,); NaN where a row is constant."""
    xc = x - x.mean(axis=-1, keepdims=True)
    yc = y - y.mean(axis=-1, keepdims=True)
    denom = np.sqrt((xc * xc).sum(-1) * (yc * yc).sum(-1))
    with np.errstate(invalid="ignore", divide="ignore"):
        return (xc * yc).sum(-1) / denom


def spearman_with_ci(
    x: Any,
    y: Any,
    n_resamples: int = 10_000,
    confidence: float = 0.95,
    seed: Seed = 0,
) -> ConfidenceInterval:
    """Spearman's rho with a percentile bootstrap interval over (x_i, y_i) pairs. ``x``, ``y``: (n,).

    Ties get average ranks (as in scipy.stats.spearmanr). Each resample is re-ranked; resamples in which
    x or y is constant have no defined rho and are left out of the quantiles.
    """
    xa = as_numpy(x, dtype=np.float64)
    ya = as_numpy(y, dtype=np.float64)
    if xa.ndim != 1 or xa.shape != ya.shape:
        raise ValueError(f"x and y must be 1-D of equal length, got {xa.shape} and {ya.shape}")
    n = xa.size
    if n < 3:
        raise ValueError(f"need at least 3 pairs, got {n}")
    rng = np.random.default_rng(seed)

    rho = float(_rowwise_pearson(rankdata(xa)[None], rankdata(ya)[None])[0])
    boot = np.empty(n_resamples)
    for start, stop in chunks(n_resamples, 2 * n):
        idx = rng.integers(0, n, size=(stop - start, n))
        boot[start:stop] = _rowwise_pearson(rankdata(xa[idx], axis=1), rankdata(ya[idx], axis=1))

    alpha = 1.0 - confidence
    if np.isnan(boot).all():
        return ConfidenceInterval(rho, float("nan"), float("nan"))
    low, high = np.nanquantile(boot, [alpha / 2, 1 - alpha / 2])
    return ConfidenceInterval(rho, float(low), float(high))
