"""Routing analysis on per-example routing read back from a run directory.

Inputs are the per-example routing the validation pass records: expert weights (n, e) and chosen expert
ids, (n,) for the top-1 expert or (n, k) for top-k, plus any per-example grouping (domain, label).

- load and entropy: how evenly the experts are used, and how confident each routing decision is;
- normalised mutual information and its permutation test: do experts track domains?
- linear separability: how well could any router of the form the mixture uses (an arg-max over a linear
  function of its features) route by group, if it were told the groups? A supervised reference for the NMI
  a label-free router can be asked to reach.

Collapse detection lives with the router (``moe_prefix.router.detect_collapse``), since training uses it too.

References: Strehl & Ghosh (2002) and Vinh, Epps & Bailey (2010) for NMI.

Axis key: ``n`` examples, ``e`` experts, ``k`` top-k, ``r`` permutations, ``i``/``j`` labels of the two
labelings being compared.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
from scipy.optimize import minimize
from scipy.special import log_softmax

from .stats import Seed, as_numpy, chunks

__all__ = [
    "RoutingEntropy",
    "Separability",
    "expert_load",
    "dead_expert_count",
    "routing_entropy",
    "normalized_mutual_info",
    "nmi_permutation_test",
    "linear_separability",
    "GroupExperts",
    "group_experts",
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
    r = as_numpy(routing)
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


def dead_expert_count(share: Any) -> int:
    """Experts whose share of the routing (mean weight over examples, (e,)) is below 1/(4e): a quarter of an
    even split. Training logs `val/dead_experts` with this rule; sweep tables recount it from routing.csv."""
    s = as_numpy(share, dtype=np.float64)
    return int((s < 1 / (4 * s.size)).sum())


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
    w = _normalise_rows(as_numpy(weights, dtype=np.float64))
    mean_h = float(_entropy(w).mean())
    load_h = float(_entropy(w.mean(axis=0)))
    if normalize:
        e = w.shape[1]
        scale = np.log(e) if e > 1 else 1.0
        mean_h, load_h = mean_h / scale, load_h / scale
    # H(mean) >= mean(H) by concavity; clip the rounding so the difference stays a valid MI.
    return RoutingEntropy(mean_h, load_h, max(load_h - mean_h, 0.0))


def _codes(labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Sorted unique labels and the integer code of every element: (n,) -> (u,), (n,)."""
    arr = as_numpy(labels)
    if arr.ndim != 1:
        raise ValueError(f"labels must be 1-D, got shape {arr.shape}")
    uniq, inv = np.unique(arr, return_inverse=True)
    return uniq, inv.ravel()


def _table(codes_a: np.ndarray, codes_b: np.ndarray, ka: int, kb: int) -> np.ndarray:
    """Contingency counts (ka, kb) of two integer codings of the same n elements."""
    return np.bincount(codes_a * kb + codes_b, minlength=ka * kb).reshape(ka, kb)


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


class Separability(NamedTuple):
    """Held-out figures of a linear classifier of the groups: accuracy and NMI(group, predicted group)."""

    accuracy: float
    nmi: float


def _softmax_regression(x: np.ndarray, y: np.ndarray, num_classes: int, l2: float) -> np.ndarray:
    """Multinomial logistic regression by L-BFGS: x (n m), y (n) -> weights (m+1 c), the last row a bias.

    The loss is the mean cross-entropy plus l2 * |W|^2 (bias excluded): without it, separable groups would
    send the weights to infinity."""
    n, m = x.shape
    xb = np.hstack([x, np.ones((n, 1))])
    onehot = np.eye(num_classes)[y]

    def loss_and_grad(flat):
        w = flat.reshape(m + 1, num_classes)
        logp = log_softmax(xb @ w, axis=1)
        loss = -(onehot * logp).sum() / n + l2 * (w[:-1] ** 2).sum()
        grad = xb.T @ (np.exp(logp) - onehot) / n
        grad[:-1] += 2 * l2 * w[:-1]
        return loss, grad.ravel()

    fitted = minimize(loss_and_grad, np.zeros((m + 1) * num_classes), jac=True, method="L-BFGS-B")
    return fitted.x.reshape(m + 1, num_classes)


def linear_separability(
    features: Any, groups: Any, holdout: float = 1 / 3, seed: Seed = 0, l2: float = 1e-4
) -> Separability:
    """How well a linear router on these features could route by group, judged on inputs it was not fitted on.

    ``features`` (n m), ``groups`` (n,) of any label type. A multinomial logistic regression is fitted on a
    seeded random (1 - holdout) of the rows with the groups as labels; its arg-max on the rest is compared
    with their groups. The mixture's router is an arg-max over a linear function of its (LayerNorm-ed)
    features, so this is what a router of that form reaches when it is told the groups: a supervised
    reference for the NMI that a router trained without them can be asked for. Features are standardised
    first (the fit, not the decision rule, depends on their scale).
    """
    x = as_numpy(features, np.float64)
    names, y = _codes(groups)
    if x.ndim != 2 or x.shape[0] != y.size:
        raise ValueError(f"features must be (n m) with one row per group label, got {x.shape} and {y.size} labels")
    if not 0 < holdout < 1:
        raise ValueError(f"holdout is the held-out share of the rows, in (0, 1), got {holdout}")
    order = np.random.default_rng(seed).permutation(y.size)
    cut = int(round(y.size * (1 - holdout)))
    fit, held = order[:cut], order[cut:]
    if held.size == 0 or fit.size == 0:
        raise ValueError(f"{y.size} rows leave nothing to fit or to hold out at holdout={holdout}")
    mean, std = x[fit].mean(0), x[fit].std(0)
    z = (x - mean) / np.where(std > 0, std, 1.0)
    w = _softmax_regression(z[fit], y[fit], names.size, l2)
    predicted = (np.hstack([z[held], np.ones((held.size, 1))]) @ w).argmax(1)
    return Separability(float((predicted == y[held]).mean()), normalized_mutual_info(y[held], predicted))


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
    for start, stop in chunks(n_permutations, max(n, ka * kb)):
        r = stop - start
        shuffled = rng.permuted(np.tile(cb, (r, 1)), axis=1)  # (r, n)
        flat = (ca * kb + shuffled) + (np.arange(r) * (ka * kb))[:, None]
        tables = np.bincount(flat.ravel(), minlength=r * ka * kb).reshape(r, ka, kb)
        count += int(np.count_nonzero(_mutual_info(tables, rows, cols, n) >= observed - gamma))
    return nmi, (count + 1) / (n_permutations + 1)


class GroupExperts(NamedTuple):
    """Which experts each group (a gem4 source, a domain) goes to; rows of both matrices sum to 1.

    ``top1_share`` (g e): share of the group's examples whose largest routing weight is on expert e;
    ``mean_weight`` (g e): the group's mean routing weight on e (top-k: zero off the chosen banks), which also
    counts the second choice that top-1 ignores.
    """

    names: list[str]  # (g) group names, sorted
    counts: np.ndarray  # (g) examples per group
    top1_share: np.ndarray
    mean_weight: np.ndarray


def group_experts(groups: Any, weights: Any) -> GroupExperts:
    """Routing per group from per-example groups (n) and routing weights (n e); top-1 is the arg-max weight."""
    g = np.asarray(groups)
    w = as_numpy(weights, dtype=np.float64)
    if w.ndim != 2 or len(g) != len(w):
        raise ValueError(f"groups (n) and weights (n e) must describe the same examples, got {g.shape} and {w.shape}")
    names = sorted({str(x) for x in g.tolist()})
    members = np.array([[str(x) == name for x in g.tolist()] for name in names], dtype=np.float64)  # (g n)
    counts = members.sum(1).astype(np.int64)  # whole examples: the notebook prints "n=40", not "n=40.0"
    top1 = np.eye(w.shape[1])[w.argmax(1)]  # (n e) one-hot
    return GroupExperts(names, counts, members @ top1 / counts[:, None], members @ w / counts[:, None])


@dataclass
class RoutingTable:
    """routing.csv as arrays: one row per validation example."""

    ids: np.ndarray  # (n) example ids (strings)
    groups: np.ndarray  # (n) group names, "" where the example has none (or the table has no group column)
    loss: np.ndarray  # (n) per-example task loss
    input_len: np.ndarray  # (n) real tokens
    labels: np.ndarray | None = None  # (n) classification only
    predictions: np.ndarray | None = None  # (n) classification only
    prefix_len: np.ndarray | None = None  # (n) prefix length (mean over the chosen banks); None: no router
    experts: np.ndarray | None = None  # (n k) chosen banks
    weights: np.ndarray | None = None  # (n e) routing weights, zero off the chosen banks

    @property
    def routed(self) -> bool:
        return self.weights is not None

    @property
    def num_experts(self) -> int:
        return 0 if self.weights is None else self.weights.shape[1]

    @property
    def top1(self) -> np.ndarray:
        """(n) expert with the largest routing weight."""
        return self.weights.argmax(1)
