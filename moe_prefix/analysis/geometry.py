"""Prefix geometry: how many directions a prefix uses, how alike two prefixes or representations are, and
how far prefix keys sit from the keys the frozen model produces for real tokens.

Inputs are numpy arrays or torch tensors (detached and moved to CPU); all work is done in float64 numpy and
results are numpy arrays or Python floats.

References:
- Roy & Vetterli, "The effective rank: a measure of effective dimensionality" (EUSIPCO 2007).
- Kornblith, Norouzi, Lee & Hinton, "Similarity of neural network representations revisited" (ICML 2019).
- Björck & Golub, "Numerical methods for computing angles between linear subspaces" (1973).
- Ledoit & Wolf, "A well-conditioned estimator for large-dimensional covariance matrices" (2004).

Axis key: ``p`` prefix positions, ``d`` head dim (or any feature dim), ``n`` reference vectors or examples,
``...`` leading batch axes such as (l, h) for layers and heads.
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from .stats import as_numpy

__all__ = [
    "effective_rank",
    "linear_cka",
    "principal_angles",
    "mahalanobis_distance",
    "mean_cosine_to_reference",
]


def _float(x: Any) -> np.ndarray:
    return as_numpy(x, dtype=np.float64)


def _scalar(x: np.ndarray) -> Any:
    """Python float for 0-d results, the array otherwise."""
    return float(x) if np.ndim(x) == 0 else x


def effective_rank(matrix: Any) -> Any:
    """Effective rank exp(H(σ / Σσ)) of each matrix (Roy & Vetterli 2007): (..., p, d) -> (...).

    H is the Shannon entropy (nats) of the singular values normalised to sum to one: a matrix with r equal
    non-zero singular values has effective rank exactly r; it lies in [1, min(p, d)] for any non-zero
    matrix. An all-zero matrix gets 0.
    """
    m = _float(matrix)
    if m.ndim < 2:
        raise ValueError(f"expected (..., p, d), got shape {m.shape}")
    sv = np.linalg.svd(m, compute_uv=False)  # (..., min(p, d))
    total = sv.sum(axis=-1, keepdims=True)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = sv / total
        h = -np.where(q > 0, q * np.log(q), 0.0).sum(axis=-1)
    rank = np.where(total[..., 0] > 0, np.exp(h), 0.0)
    return _scalar(rank)


def linear_cka(x: Any, y: Any) -> float:
    """Linear centred kernel alignment of two representations of the same n examples, in [0, 1].

    ``x``: (n, d1), ``y``: (n, d2). Feature-space form (Kornblith et al. 2019, eq. 3 with linear kernels):
    CKA = ||Yᵀ X||²_F / (||Xᵀ X||_F ||Yᵀ Y||_F) on column-centred X, Y. Invariant to orthogonal transforms
    and isotropic scaling of either argument, not to arbitrary invertible linear maps. Costs d1 × d2 memory.
    """
    xa, ya = _float(x), _float(y)
    if xa.ndim != 2 or ya.ndim != 2 or xa.shape[0] != ya.shape[0]:
        raise ValueError(f"x and y must be (n, d1) and (n, d2) with the same n, got {xa.shape}, {ya.shape}")
    if xa.shape[0] < 2:
        raise ValueError("need at least 2 examples")
    xc = xa - xa.mean(axis=0)
    yc = ya - ya.mean(axis=0)
    cross = np.linalg.norm(yc.T @ xc) ** 2
    denom = np.linalg.norm(xc.T @ xc) * np.linalg.norm(yc.T @ yc)
    if denom == 0:
        return float("nan")  # a constant representation has no geometry to compare
    return float(cross / denom)


def principal_angles(a: Any, b: Any) -> np.ndarray:
    """Principal angles (radians, ascending) between the column spaces of ``a`` (m, p) and ``b`` (m, q).

    Returns min(p, q) angles in [0, π/2]: 0 for a shared direction, π/2 for orthogonal ones. Orthonormal
    bases come from QR, so both inputs need full column rank. Cosines are the singular values of QaᵀQb;
    angles below π/4 are taken from the sines instead (Björck & Golub 1973), since arccos loses accuracy
    near 0. For prefix keys (p, d) compare the spans of their rows: pass ``keys.T``.
    """
    aa, bb = _float(a), _float(b)
    if aa.ndim != 2 or bb.ndim != 2 or aa.shape[0] != bb.shape[0]:
        raise ValueError(f"a and b must be (m, p) and (m, q) with the same m, got {aa.shape}, {bb.shape}")
    if aa.shape[1] > aa.shape[0] or bb.shape[1] > bb.shape[0]:
        raise ValueError("more columns than rows: the columns cannot be linearly independent")
    qa = np.linalg.qr(aa)[0]
    qb = np.linalg.qr(bb)[0]
    if qa.shape[1] < qb.shape[1]:
        qa, qb = qb, qa  # the angles are symmetric; keep the wider basis first
    overlap = qa.T @ qb  # (p, q), p >= q
    cos = np.clip(np.linalg.svd(overlap, compute_uv=False), 0.0, 1.0)  # descending: angles ascending
    residual = qb - qa @ overlap  # part of span(b) outside span(a); its singular values are the sines
    sin = np.clip(np.linalg.svd(residual, compute_uv=False)[::-1], 0.0, 1.0)  # ascending
    return np.where(cos**2 >= 0.5, np.arcsin(sin), np.arccos(cos))


def _covariance(reference: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Mean (..., 1, d), centred reference (..., n, d) and maximum-likelihood covariance (..., d, d)."""
    mean = reference.mean(axis=-2, keepdims=True)
    centred = reference - mean
    cov = np.swapaxes(centred, -1, -2) @ centred / reference.shape[-2]
    return mean, centred, cov


def _ledoit_wolf(centred: np.ndarray, cov: np.ndarray) -> np.ndarray:
    """Ledoit–Wolf (2004) shrinkage intensity (...,) in [0, 1] towards (tr S / d) I, as sklearn's, for (..., n, d)."""
    n, d = centred.shape[-2:]
    target = np.trace(cov, axis1=-2, axis2=-1) / d  # (...)
    eye = np.eye(d)
    # δ² = ||S - μI||²_F: how far S is from the target
    delta2 = ((cov - target[..., None, None] * eye) ** 2).sum(axis=(-2, -1))
    # β̄² = Σ_k ||x_k x_kᵀ - S||²_F / n² = (Σ_k ||x_k||⁴ - n ||S||²_F) / n²: the sampling noise of S
    norms4 = ((centred**2).sum(axis=-1) ** 2).sum(axis=-1)
    beta2 = (norms4 - n * (cov**2).sum(axis=(-2, -1))) / n**2
    beta2 = np.minimum(beta2, delta2)
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(delta2 > 0, beta2 / delta2, 0.0)


def _points_and_reference(points: Any, reference: Any) -> tuple[np.ndarray, np.ndarray]:
    """float64 points (..., p, d) and reference (..., n, d), checked to share d."""
    x, ref = _float(points), _float(reference)
    if x.ndim < 2 or ref.ndim < 2 or x.shape[-1] != ref.shape[-1]:
        raise ValueError(f"points (..., p, d) and reference (..., n, d) must share d: {x.shape}, {ref.shape}")
    return x, ref


def mahalanobis_distance(
    points: Any, reference: Any, shrinkage: float | Literal["ledoit-wolf"] = "ledoit-wolf"
) -> np.ndarray:
    """Mahalanobis distance of each point from the distribution of ``reference`` vectors.

    ``points``: (..., p, d), e.g. prefix keys of one head; ``reference``: (..., n, d), e.g. the frozen
    model's keys for real tokens at the same layer and head; leading axes must match (or broadcast).
    Returns (..., p): sqrt((x - μ)ᵀ Σ⁻¹ (x - μ)) with μ the reference mean and Σ = (1 - λ) S + λ (tr S / d) I,
    S the maximum-likelihood covariance. ``shrinkage`` is λ in [0, 1] or "ledoit-wolf" for the
    Ledoit–Wolf estimate; λ = 0 needs n > d. For points drawn from the reference distribution the squared
    distance averages about d, which gives the scale: a prefix key at distance 3√d is far out of
    distribution.
    """
    x, ref = _points_and_reference(points, reference)
    mean, centred, cov = _covariance(ref)
    d = ref.shape[-1]
    if shrinkage == "ledoit-wolf":
        lam = _ledoit_wolf(centred, cov)
    elif isinstance(shrinkage, int | float) and 0.0 <= shrinkage <= 1.0:
        lam = np.full(cov.shape[:-2], float(shrinkage))
    else:
        raise ValueError(f"shrinkage must be a number in [0, 1] or 'ledoit-wolf', got {shrinkage!r}")
    target = np.trace(cov, axis1=-2, axis2=-1) / d
    lam = lam[..., None, None]
    shrunk = (1 - lam) * cov + lam * target[..., None, None] * np.eye(d)

    diff = x - mean  # (..., p, d)
    solved = np.linalg.solve(shrunk, np.swapaxes(diff, -1, -2))  # (..., d, p)
    squared = (np.swapaxes(diff, -1, -2) * solved).sum(axis=-2)
    return np.sqrt(np.maximum(squared, 0.0))


def mean_cosine_to_reference(points: Any, reference: Any) -> np.ndarray:
    """Mean cosine similarity of each point to the reference vectors: (..., p, d), (..., n, d) -> (..., p).

    Computed as cos-normalised points dotted with the mean of the cos-normalised references, i.e. the exact
    average over all p × n pairs without forming them. Zero vectors count as cosine 0.
    """
    x, ref = _points_and_reference(points, reference)

    def unit(v: np.ndarray) -> np.ndarray:
        norm = np.linalg.norm(v, axis=-1, keepdims=True)
        return np.divide(v, norm, out=np.zeros_like(v), where=norm > 0)

    centre = unit(ref).mean(axis=-2)  # (..., d)
    return (unit(x) * centre[..., None, :]).sum(axis=-1)
