"""Routing analysis on per-example routing read back from a run directory.

Inputs are the per-example routing the validation pass records: expert weights (n, e) and chosen expert
ids, (n,) for the top-1 expert or (n, k) for top-k, plus any per-example grouping (domain, label).

- load and entropy: how evenly the experts are used, and how confident each routing decision is;
- contingency tables, normalised mutual information and its permutation test: do experts track domains?
- adjusted Rand index and Hungarian matching: do two runs (seeds) route the same examples together?

References: Strehl & Ghosh (2002) and Vinh, Epps & Bailey (2010) for NMI; Hubert & Arabie (1985) for the
adjusted Rand index; Kuhn (1955) for the assignment problem (scipy.optimize.linear_sum_assignment).

Axis key: ``n`` examples, ``e`` experts, ``k`` top-k, ``r`` permutations, ``i``/``j`` labels of the two
labelings being compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import linear_sum_assignment

from .stats import Seed, _as_numpy, _chunks

__all__ = [
    "RoutingEntropy",
    "CollapseReport",
    "Contingency",
    "Agreement",
    "expert_load",
    "routing_entropy",
    "detect_collapse",
    "contingency",
    "normalized_mutual_info",
    "nmi_permutation_test",
    "adjusted_rand_index",
    "matched_agreement",
]


class RoutingEntropy(NamedTuple):
    """Entropies in nats (or in [0, 1] when normalised by log e).

    ``mean_entropy``: mean over examples of H(w_n), low when each example is routed confidently.
    ``load_entropy``: H(mean_n w_n), high when the experts are used evenly overall.
    ``mutual_information``: load_entropy - mean_entropy = I(example; expert) with examples uniform; it is
    high only when routing is both confident and balanced, i.e. the router really separates inputs.
    """

    mean_entropy: float
    load_entropy: float
    mutual_information: float


@dataclass(frozen=True)
class CollapseReport:
    """Whether one expert takes at least ``threshold`` of the load. Truthy when collapsed."""

    collapsed: bool
    expert: int  # the most loaded expert, collapsed or not
    share: float  # its share of the load

    def __bool__(self) -> bool:
        return self.collapsed


class Contingency(NamedTuple):
    """``table[i, j]``: number of examples with expert ``expert_labels[i]`` and group ``group_labels[j]``."""

    table: np.ndarray
    expert_labels: np.ndarray
    group_labels: np.ndarray


class Agreement(NamedTuple):
    """Agreement of two routings: ARI, fraction routed alike after matching ids, and the id mapping b -> a."""

    ari: float
    accuracy: float
    mapping: dict


def _entropy(p: np.ndarray, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` of probabilities ``p``, with 0 log 0 = 0."""
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(p > 0, p * np.log(p), 0.0)
    return -terms.sum(axis=axis)


def expert_load(routing: Any, num_experts: int | None = None) -> np.ndarray:
    """Fraction of the routing each expert receives: (e,), summing to 1.

    ``routing`` is either expert weights, a float array (n, e) whose rows are (re)normalised and averaged
    (the soft load), or chosen expert ids, an integer array (n,) or (n, k) whose occurrences are counted
    (the hard load; top-k counts each of the k choices). ``num_experts`` is required for ids when the last
    experts may never be chosen; for weights it defaults to e.
    """
    r = _as_numpy(routing)
    if np.issubdtype(r.dtype, np.integer):
        ids = r.ravel().astype(np.int64)
        if ids.size == 0:
            raise ValueError("no expert ids given")
        if ids.min() < 0:
            raise ValueError("expert ids must be non-negative")
        e = int(ids.max()) + 1 if num_experts is None else num_experts
        if ids.max() >= e:
            raise ValueError(f"expert id {ids.max()} out of range for num_experts={e}")
        return np.bincount(ids, minlength=e) / ids.size
    w = _normalise_rows(r)
    if num_experts is not None and num_experts != w.shape[1]:
        raise ValueError(f"weights have {w.shape[1]} experts, num_experts={num_experts}")
    return w.mean(axis=0)


def _normalise_rows(weights: np.ndarray) -> np.ndarray:
    """Validate non-negative (n, e) weights and scale each row to sum to 1."""
    w = np.asarray(weights, dtype=np.float64)
    if w.ndim != 2:
        raise ValueError(f"weights must be (n, e), got shape {w.shape}")
    if (w < 0).any():
        raise ValueError("weights must be non-negative")
    total = w.sum(axis=1, keepdims=True)
    if (total <= 0).any():
        raise ValueError("every row of weights needs positive mass")
    return w / total


def routing_entropy(weights: Any, normalize: bool = False) -> RoutingEntropy:
    """Mean per-example routing entropy and entropy of the mean load. ``weights``: (n, e) -> floats.

    Rows are renormalised to sum to 1 (top-k weights with zeros elsewhere are fine). With
    ``normalize=True`` every entropy is divided by log e, so 1 means uniform over all experts.
    """
    w = _normalise_rows(_as_numpy(weights, dtype=np.float64))
    mean_h = float(_entropy(w).mean())
    load_h = float(_entropy(w.mean(axis=0)))
    if normalize:
        e = w.shape[1]
        scale = np.log(e) if e > 1 else 1.0
        mean_h, load_h = mean_h / scale, load_h / scale
    # H(mean) >= mean(H) by concavity; clip the rounding so the difference stays a valid MI.
    return RoutingEntropy(mean_h, load_h, max(load_h - mean_h, 0.0))


def detect_collapse(load: Any, threshold: float = 0.9) -> CollapseReport:
    """Report whether a single expert takes at least ``threshold`` of ``load`` (e,) (fractions or counts).

    The report is truthy when collapsed, so ``if detect_collapse(load): warn(...)`` works; it also names the
    most loaded expert (``report.expert``, which may be 0: test the report, not the index).
    """
    lo = _as_numpy(load, dtype=np.float64)
    if lo.ndim != 1 or lo.size == 0 or (lo < 0).any() or lo.sum() <= 0:
        raise ValueError("load must be a non-empty 1-D array of non-negative values with positive sum")
    share = lo / lo.sum()
    top = int(np.argmax(share))
    return CollapseReport(bool(share[top] >= threshold), top, float(share[top]))


def _codes(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique labels and the integer code of every element: (n,) -> (u,), (n,)."""
    arr = _as_numpy(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    uniq, inv = np.unique(arr, return_inverse=True)
    return uniq, inv.ravel()


def _table(codes_a: np.ndarray, codes_b: np.ndarray, ka: int, kb: int) -> np.ndarray:
    """Contingency counts (ka, kb) of two integer codings of the same n elements."""
    return np.bincount(codes_a * kb + codes_b, minlength=ka * kb).reshape(ka, kb)


def contingency(experts: Any, groups: Any) -> Contingency:
    """Cross-tabulate chosen experts (n,) against groups (n,) (ints or strings): table (i, j) of counts.

    Only labels that occur get a row or column; labels are sorted as by ``np.unique``.
    """
    ea, ec = _codes(experts)
    ga, gc = _codes(groups)
    if ec.size != gc.size:
        raise ValueError(f"experts and groups differ in length: {ec.size} vs {gc.size}")
    return Contingency(_table(ec, gc, ea.size, ga.size), ea, ga)


def _mutual_info(tables: np.ndarray, rows: np.ndarray, cols: np.ndarray, n: int) -> np.ndarray:
    """MI in nats of contingency tables (..., i, j) sharing margins ``rows`` (i,) and ``cols`` (j,)."""
    outer = np.outer(rows, cols).astype(np.float64)  # expected count × n
    c = tables.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        terms = np.where(c > 0, c * np.log(c * n / outer), 0.0)
    return np.clip(terms.sum(axis=(-2, -1)) / n, 0.0, None)


def normalized_mutual_info(labels_a: Any, labels_b: Any) -> float:
    """NMI = MI(a, b) / ((H(a) + H(b)) / 2), in [0, 1]; the arithmetic normalisation of sklearn's default.

    ``labels_a``, ``labels_b``: (n,) of any hashable label type; invariant to renaming labels. Limit cases
    follow sklearn: both labelings a single cluster -> 1.0; otherwise MI = 0 -> 0.0.
    """
    ua, ca = _codes(labels_a)
    ub, cb = _codes(labels_b)
    if ca.size != cb.size:
        raise ValueError(f"labelings differ in length: {ca.size} vs {cb.size}")
    if ua.size == ub.size == 1 or ca.size == 0:
        return 1.0
    n = ca.size
    rows, cols = np.bincount(ca), np.bincount(cb)
    mi = float(_mutual_info(_table(ca, cb, ua.size, ub.size), rows, cols, n))
    if mi == 0.0:
        return 0.0
    h = (_entropy(rows / n) + _entropy(cols / n)) / 2
    return float(mi / h)


def nmi_permutation_test(
    labels_a: Any, labels_b: Any, n_permutations: int = 1000, seed: Seed = 0
) -> tuple[float, float]:
    """NMI and its permutation p-value for H0 "a and b are independent": returns (nmi, p_value).

    ``b`` is shuffled against ``a`` ``n_permutations`` times; all permuted contingency tables of a chunk are
    counted by one ``bincount``. Shuffling keeps both margins, hence both entropies, so the test orders
    permutations by MI. One-sided (more dependence than chance), p = (count + 1) / (n_permutations + 1)
    with ties counted as extreme.
    """
    nmi = normalized_mutual_info(labels_a, labels_b)
    ua, ca = _codes(labels_a)
    ub, cb = _codes(labels_b)
    if ua.size == 1 or ub.size == 1:  # a constant labeling carries no information under any shuffle
        return nmi, 1.0
    n, ka, kb = ca.size, ua.size, ub.size
    rows, cols = np.bincount(ca), np.bincount(cb)
    observed = _mutual_info(_table(ca, cb, ka, kb), rows, cols, n)
    gamma = 1e-12 * max(float(observed), 1.0)  # equal tables summed in another order

    rng = np.random.default_rng(seed)
    count = 0
    for start, stop in _chunks(n_permutations, max(n, ka * kb)):
        r = stop - start
        shuffled = rng.permuted(np.tile(cb, (r, 1)), axis=1)  # (r, n)
        flat = (ca * kb + shuffled) + (np.arange(r) * (ka * kb))[:, None]
        tables = np.bincount(flat.ravel(), minlength=r * ka * kb).reshape(r, ka, kb)
        count += int(np.count_nonzero(_mutual_info(tables, rows, cols, n) >= observed - gamma))
    return nmi, (count + 1) / (n_permutations + 1)


def _comb2(x: np.ndarray) -> np.ndarray:
    """x choose 2, elementwise, in float64 (no overflow for large counts)."""
    x = np.asarray(x, dtype=np.float64)
    return x * (x - 1) / 2


def _ari_from_table(table: np.ndarray) -> float:
    """Hubert–Arabie adjusted Rand index of a contingency table (i, j)."""
    n = table.sum()
    pairs = _comb2(table).sum()
    pairs_a = _comb2(table.sum(axis=1)).sum()
    pairs_b = _comb2(table.sum(axis=0)).sum()
    total = _comb2(n)
    if total == 0:
        return 1.0
    expected = pairs_a * pairs_b / total
    maximum = (pairs_a + pairs_b) / 2
    if maximum == expected:  # both one cluster, or both all singletons: identical partitions
        return 1.0
    return float((pairs - expected) / (maximum - expected))


def adjusted_rand_index(labels_a: Any, labels_b: Any) -> float:
    """Adjusted Rand index of two labelings (n,): 1 for the same partition, about 0 for independent ones.

    Counts pairs of examples put together or apart by both labelings, corrected for chance (Hubert &
    Arabie 1985); invariant to renaming labels, so expert ids of two runs need no matching.
    """
    table = contingency(labels_a, labels_b).table
    return _ari_from_table(table)


def matched_agreement(labels_a: Any, labels_b: Any) -> Agreement:
    """Compare two routings (n,) of the same examples, e.g. top-1 experts of two seeds.

    Expert ids of run b are matched one-to-one to ids of run a by the assignment that maximises the number
    of examples routed alike (Hungarian algorithm on the contingency table). Returns
    ``Agreement(ari, accuracy, mapping)``: ARI (already matching-free), the fraction of examples whose b id
    maps to their a id, and ``mapping`` {b id: a id}. With unequal numbers of ids, the surplus ids of the
    larger side stay unmatched (absent from ``mapping`` if in b) and count as disagreements.
    """
    table, a_ids, b_ids = contingency(labels_a, labels_b)
    rows, cols = linear_sum_assignment(table, maximize=True)
    accuracy = float(table[rows, cols].sum() / table.sum())
    mapping = dict(zip(b_ids[cols].tolist(), a_ids[rows].tolist(), strict=True))
    return Agreement(_ari_from_table(table), accuracy, mapping)
