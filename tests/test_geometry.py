import numpy as np
import pytest
from scipy.linalg import subspace_angles
from scipy.spatial.distance import mahalanobis
from scipy.stats import ortho_group

from moe_prefix.analysis.geometry import (
    effective_rank,
    linear_cka,
    mahalanobis_distance,
    mean_cosine_to_reference,
    principal_angles,
)


def _with_singular_values(sv: np.ndarray, p: int, d: int, seed: int) -> np.ndarray:
    """A (p, d) matrix with the given singular values and random singular vectors."""
    u = ortho_group.rvs(p, random_state=seed)[:, : sv.size]
    v = ortho_group.rvs(d, random_state=seed + 1)[:, : sv.size]
    return (u * sv) @ v.T


@pytest.mark.parametrize("r", [1, 3, 8])
def test_effective_rank_of_equal_singular_values_is_rank(r):
    m = _with_singular_values(np.full(r, 2.5), p=8, d=16, seed=r)
    assert effective_rank(m) == pytest.approx(r)


def test_effective_rank_hand_value_batched_and_torch():
    torch = pytest.importorskip("torch")
    # σ = (3, 1): q = (3/4, 1/4), erank = exp(-(3/4 ln 3/4 + 1/4 ln 1/4)).
    expected = np.exp(-(0.75 * np.log(0.75) + 0.25 * np.log(0.25)))
    assert effective_rank(np.diag([3.0, 1.0])) == pytest.approx(expected)
    rng = np.random.default_rng(0)
    batch = rng.normal(size=(2, 3, 4, 16))  # (l, h, p, d)
    ranks = effective_rank(torch.tensor(batch, dtype=torch.float32))
    assert ranks.shape == (2, 3)
    assert ranks[1, 2] == pytest.approx(effective_rank(batch[1, 2]), rel=1e-5)
    assert np.all((ranks >= 1) & (ranks <= 4))
    assert effective_rank(np.zeros((3, 5))) == 0.0


def test_linear_cka_self_and_invariances():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(50, 8))
    y = x @ rng.normal(size=(8, 6)) + 0.5 * rng.normal(size=(50, 6))
    base = linear_cka(x, y)
    assert linear_cka(x, x) == pytest.approx(1.0)
    assert 0.0 < base < 1.0
    q8, q6 = ortho_group.rvs(8, random_state=2), ortho_group.rvs(6, random_state=3)
    assert linear_cka(x @ q8, y) == pytest.approx(base)
    assert linear_cka(x, y @ q6) == pytest.approx(base)
    assert linear_cka(7.0 * x, y) == pytest.approx(base)
    assert linear_cka(x, 0.1 * y) == pytest.approx(base)
    assert linear_cka(x + 3.0, y) == pytest.approx(base)  # centring removes offsets
    assert linear_cka(y, x) == pytest.approx(base)


def test_linear_cka_matches_gram_form():
    # Kornblith et al. eq. 4, from n × n Gram matrices: HSIC(K, L) / sqrt(HSIC(K, K) HSIC(L, L)).
    rng = np.random.default_rng(4)
    x, y = rng.normal(size=(20, 5)), rng.normal(size=(20, 30))
    h = np.eye(20) - 1 / 20
    k, lg = h @ x @ x.T @ h, h @ y @ y.T @ h
    gram = np.sum(k * lg) / np.sqrt(np.sum(k * k) * np.sum(lg * lg))
    assert linear_cka(x, y) == pytest.approx(gram)


def test_principal_angles_identical_orthogonal_and_known():
    rng = np.random.default_rng(5)
    a = rng.normal(size=(10, 3))
    np.testing.assert_allclose(principal_angles(a, a @ rng.normal(size=(3, 3))), 0.0, atol=1e-7)
    e = np.eye(6)
    np.testing.assert_allclose(principal_angles(e[:, :2], e[:, 2:5]), np.pi / 2)
    for theta in (1e-7, 0.3, 1.2):  # tiny angles too: taken from the sine, not arccos
        b = np.cos(theta) * e[:, [0]] + np.sin(theta) * e[:, [1]]
        np.testing.assert_allclose(principal_angles(e[:, [0, 2]], b), [theta], rtol=1e-9)


def test_principal_angles_match_scipy():
    rng = np.random.default_rng(6)
    a, b = rng.normal(size=(12, 4)), rng.normal(size=(12, 3))
    angles = principal_angles(a, b)
    assert angles.shape == (3,) and np.all(np.diff(angles) >= 0)
    np.testing.assert_allclose(angles, np.sort(subspace_angles(a, b)), atol=1e-10)
    np.testing.assert_allclose(principal_angles(b, a), angles, atol=1e-12)


def test_mahalanobis_without_shrinkage_matches_scipy():
    rng = np.random.default_rng(7)
    reference = rng.normal(size=(200, 4)) @ rng.normal(size=(4, 4))
    points = rng.normal(size=(5, 4))
    cov_inv = np.linalg.inv(np.cov(reference, rowvar=False, bias=True))
    mu = reference.mean(axis=0)
    expected = [mahalanobis(x, mu, cov_inv) for x in points]
    np.testing.assert_allclose(mahalanobis_distance(points, reference, shrinkage=0.0), expected)


def test_mahalanobis_ledoit_wolf_matches_definition():
    # Ledoit & Wolf (2004), lemma 3.1-3.4 written out with explicit per-sample outer products.
    rng = np.random.default_rng(8)
    x = rng.normal(size=(30, 5)) * np.array([3.0, 1.0, 1.0, 0.5, 0.2])
    xc = x - x.mean(axis=0)
    n, d = xc.shape
    s = xc.T @ xc / n
    mu = np.trace(s) / d
    delta2 = np.sum((s - mu * np.eye(d)) ** 2)
    beta2 = sum(np.sum((np.outer(row, row) - s) ** 2) for row in xc) / n**2
    expected = min(beta2, delta2) / delta2
    assert 0 < expected < 1
    points = rng.normal(size=(4, d))
    estimated = mahalanobis_distance(points, x)  # shrinkage="ledoit-wolf"
    np.testing.assert_allclose(estimated, mahalanobis_distance(points, x, shrinkage=expected))
    # λ is scale-free: scaling one head's reference and points by 2 leaves its distances unchanged.
    batched = mahalanobis_distance(np.stack([points, 2 * points]), np.stack([x, 2 * x]))
    np.testing.assert_allclose(batched, [estimated, estimated])


def test_mahalanobis_shrinkage_keeps_few_samples_usable_and_scales_with_d():
    rng = np.random.default_rng(9)
    d = 16
    few = rng.normal(size=(8, d))  # n < d: the raw covariance is singular
    assert np.all(np.isfinite(mahalanobis_distance(rng.normal(size=(3, d)), few)))
    # In-distribution points have squared distance about d; a shifted point is far out.
    reference = rng.normal(size=(4000, d))
    inside = mahalanobis_distance(rng.normal(size=(500, d)), reference)
    assert np.mean(inside**2) == pytest.approx(d, rel=0.1)
    assert mahalanobis_distance(np.full((1, d), 5.0), reference)[0] > 3 * np.sqrt(d)


def test_mahalanobis_and_cosine_batched_over_heads():
    rng = np.random.default_rng(10)
    keys = rng.normal(size=(2, 4, 8))  # (h, p, d)
    reference = rng.normal(size=(2, 50, 8))  # (h, n, d)
    dist = mahalanobis_distance(keys, reference, shrinkage=0.2)
    assert dist.shape == (2, 4)
    np.testing.assert_allclose(dist[1], mahalanobis_distance(keys[1], reference[1], shrinkage=0.2))
    cos = mean_cosine_to_reference(keys, reference)
    assert cos.shape == (2, 4)
    for h in range(2):
        norms = np.outer(np.linalg.norm(keys[h], axis=1), np.linalg.norm(reference[h], axis=1))
        np.testing.assert_allclose(cos[h], np.mean(keys[h] @ reference[h].T / norms, axis=1))


def test_mean_cosine_limits():
    ref = np.array([[1.0, 0.0], [2.0, 0.0]])
    points = np.array([[3.0, 0.0], [0.0, 1.0], [-1.0, 0.0], [0.0, 0.0]])
    np.testing.assert_allclose(mean_cosine_to_reference(points, ref), [1, 0, -1, 0])
