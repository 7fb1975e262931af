import numpy as np
import pytest
from scipy import stats as sps

from moe_prefix.analysis.routing_stats import (
    expert_load,
    group_experts,
    linear_separability,
    nmi_permutation_test,
    normalized_mutual_info,
    routing_entropy,
)


def test_expert_load_from_weights_and_ids():
    weights = np.array([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0], [0.0, 2.0, 2.0]])  # last row unnormalised
    np.testing.assert_allclose(expert_load(weights), [0.5, 1 / 3, 1 / 6])
    np.testing.assert_allclose(expert_load(np.array([0, 0, 2, 2])), [0.5, 0.0, 0.5])
    np.testing.assert_allclose(expert_load(np.array([0, 1]), num_experts=4), [0.5, 0.5, 0, 0])
    topk = np.array([[0, 1], [0, 2], [0, 1]])  # (n, k): every choice counts
    np.testing.assert_allclose(expert_load(topk), [3 / 6, 2 / 6, 1 / 6])
    with pytest.raises(ValueError):
        expert_load(np.array([0, 5]), num_experts=3)


def test_expert_load_accepts_torch():
    torch = pytest.importorskip("torch")
    np.testing.assert_allclose(expert_load(torch.tensor([1, 1, 0, 2])), [0.25, 0.5, 0.25])
    weights = torch.softmax(torch.zeros(5, 4, requires_grad=True), dim=-1)
    np.testing.assert_allclose(expert_load(weights), np.full(4, 0.25))


def test_routing_entropy_limits():
    e = 4
    uniform = routing_entropy(np.full((10, e), 1 / e))
    assert uniform.mean_entropy == pytest.approx(np.log(e))
    assert uniform.load_entropy == pytest.approx(np.log(e))
    assert uniform.mutual_information == pytest.approx(0.0)
    one_hot = routing_entropy(np.eye(e)[np.arange(12) % e], normalize=True)  # confident and balanced
    assert one_hot == pytest.approx((0.0, 1.0, 1.0))
    collapsed = routing_entropy(np.eye(e)[np.zeros(12, dtype=int)])
    assert collapsed == pytest.approx((0.0, 0.0, 0.0))


def test_nmi_identical_and_relabelled_is_one():
    rng = np.random.default_rng(0)
    labels = rng.integers(0, 5, size=300)
    assert normalized_mutual_info(labels, labels) == pytest.approx(1.0)
    relabel = np.array(["e", "a", "d", "b", "c"])[labels]
    assert normalized_mutual_info(labels, relabel) == pytest.approx(1.0)
    assert normalized_mutual_info(relabel, labels) == pytest.approx(1.0)


def test_nmi_independent_is_near_zero():
    rng = np.random.default_rng(1)
    a = rng.integers(0, 4, size=100_000)
    b = rng.integers(0, 5, size=100_000)
    assert normalized_mutual_info(a, b) < 1e-3


def test_nmi_hand_example():
    # a = [0, 0, 1, 1], b = [0, 0, 0, 1]. Joint: (0, 0) 1/2, (1, 0) 1/4, (1, 1) 1/4; margins a (1/2, 1/2),
    # b (3/4, 1/4). MI = 1/2 ln(1/2 / (1/2 * 3/4)) + 1/4 ln(1/4 / (1/2 * 3/4)) + 1/4 ln(1/4 / (1/2 * 1/4))
    #    = 1/2 ln(4/3) + 1/4 ln(2/3) + 1/4 ln 2.
    # H(a) = ln 2, H(b) = -(3/4 ln 3/4 + 1/4 ln 1/4); NMI = MI / ((H(a) + H(b)) / 2).
    mi = 0.5 * np.log(4 / 3) + 0.25 * np.log(2 / 3) + 0.25 * np.log(2)
    h_a = np.log(2)
    h_b = -(0.75 * np.log(0.75) + 0.25 * np.log(0.25))
    expected = mi / ((h_a + h_b) / 2)
    assert normalized_mutual_info([0, 0, 1, 1], [0, 0, 0, 1]) == pytest.approx(expected)
    assert normalized_mutual_info([0, 0, 0, 1], [0, 0, 1, 1]) == pytest.approx(expected)


def test_nmi_limit_cases_follow_sklearn():
    assert normalized_mutual_info([1, 1, 1], [7, 7, 7]) == 1.0  # neither labeling splits the data
    assert normalized_mutual_info([0, 0, 0, 0], [0, 1, 2, 3]) == 0.0


def test_nmi_permutation_detects_dependence():
    rng = np.random.default_rng(2)
    domain = rng.integers(0, 4, size=400)
    expert = np.where(rng.random(400) < 0.5, domain, rng.integers(0, 4, size=400))
    nmi, p = nmi_permutation_test(expert, domain, n_permutations=499, seed=0)
    assert nmi == pytest.approx(normalized_mutual_info(expert, domain))
    assert p == pytest.approx(1 / 500)
    assert nmi_permutation_test(expert, domain, n_permutations=499, seed=0) == (nmi, p)
    assert nmi_permutation_test(np.zeros(10, dtype=int), domain[:10], n_permutations=9)[1] == 1.0


def test_nmi_permutation_uniform_under_null():
    rng = np.random.default_rng(3)
    pvalues = np.array(
        [
            nmi_permutation_test(rng.integers(0, 3, size=200), rng.integers(0, 4, size=200), 200, seed=s)[1]
            for s in range(200)
        ]
    )
    low, high = int(sps.binom.ppf(0.001, 200, 0.05)), int(sps.binom.isf(0.001, 200, 0.05))
    assert low <= np.count_nonzero(pvalues <= 0.05) <= high
    assert sps.kstest(pvalues, "uniform").pvalue > 0.01


def test_linear_separability_reaches_the_bayes_accuracy_of_two_gaussians():
    """Two classes N(±e1, I) in 3-D: the best rule of any kind is the sign of x1, right with probability Φ(1);
    its NMI with the class is 1 - H2(1 - Φ(1)) (balanced classes, symmetric errors)."""
    rng = np.random.default_rng(0)
    y = rng.integers(0, 2, 9000)
    x = rng.normal(size=(9000, 3))
    x[:, 0] += 2 * y - 1
    got = linear_separability(x, np.where(y == 1, "pos", "neg"), seed=1)
    bayes = sps.norm.cdf(1.0)
    assert got.accuracy == pytest.approx(bayes, abs=0.025)  # 3000 held out: standard error 0.007
    error = 1 - bayes
    assert got.nmi == pytest.approx(1 + error * np.log2(error) + bayes * np.log2(bayes), abs=0.04)


def test_linear_separability_of_separated_and_of_unrelated_groups():
    rng = np.random.default_rng(0)
    centres = rng.normal(size=(4, 16)) * 10
    groups = rng.integers(0, 4, 1200)
    x = centres[groups] + rng.normal(size=(1200, 16))
    assert linear_separability(x, groups) == pytest.approx((1.0, 1.0))
    unrelated = linear_separability(rng.normal(size=(1200, 16)), groups)
    assert unrelated.accuracy < 0.35 and unrelated.nmi < 0.02  # chance is 0.25
    with pytest.raises(ValueError, match="one row per group label"):
        linear_separability(x[:-1], groups)
    with pytest.raises(ValueError, match="holdout is the held-out share"):
        linear_separability(x, groups, holdout=1.0)


def test_group_experts_counts_top1_and_mean_weight_per_group():
    """By hand: source a (3 inputs) puts its top-1 on e0 twice and e1 once; b (1 input) on e2."""
    groups = ["b", "a", "a", "a"]
    weights = [[0.0, 0.3, 0.7], [0.6, 0.4, 0.0], [0.5, 0.0, 0.5], [0.2, 0.8, 0.0]]  # a tie goes to the first expert
    out = group_experts(groups, weights)
    assert out.names == ["a", "b"] and out.counts.tolist() == [3, 1] and out.counts.dtype.kind == "i"
    np.testing.assert_allclose(out.top1_share, [[2 / 3, 1 / 3, 0], [0, 0, 1]])
    np.testing.assert_allclose(out.mean_weight, [[1.3 / 3, 1.2 / 3, 0.5 / 3], [0, 0.3, 0.7]])
    with pytest.raises(ValueError, match="same examples"):
        group_experts(groups[:3], weights)
