import numpy as np
import pytest
from scipy import stats as sps

from moe_prefix.analysis.routing_stats import (
    adjusted_rand_index,
    contingency,
    detect_collapse,
    expert_load,
    matched_agreement,
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


def test_detect_collapse():
    report = detect_collapse(np.array([0.95, 0.03, 0.02]))
    assert report and report.expert == 0 and report.share == pytest.approx(0.95)
    balanced = detect_collapse(np.array([30, 40, 30]))  # counts are fine too
    assert not balanced and balanced.expert == 1 and balanced.share == pytest.approx(0.4)
    assert detect_collapse(np.array([0.1, 0.6, 0.3]), threshold=0.5).expert == 1


def test_contingency_with_string_groups():
    table, experts, groups = contingency([2, 0, 2, 2, 0], ["nyt", "tweets", "nyt", "tweets", "tweets"])
    np.testing.assert_array_equal(experts, [0, 2])
    np.testing.assert_array_equal(groups, ["nyt", "tweets"])
    np.testing.assert_array_equal(table, [[0, 2], [2, 1]])


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


def test_ari_identical_relabelled_and_hand_example():
    rng = np.random.default_rng(4)
    labels = rng.integers(0, 4, size=100)
    assert adjusted_rand_index(labels, labels) == pytest.approx(1.0)
    assert adjusted_rand_index(labels, (labels + 2) % 4) == pytest.approx(1.0)
    # a = [0, 0, 1, 2], b = [0, 0, 1, 1]: table [[2, 0], [0, 1], [0, 1]].
    # Σ C(n_ij, 2) = 1; rows (2, 1, 1) give Σ C = 1; columns (2, 2) give Σ C = 2; C(4, 2) = 6.
    # expected = 1 * 2 / 6 = 1/3, max = (1 + 2) / 2 = 3/2, ARI = (1 - 1/3) / (3/2 - 1/3) = 4/7.
    assert adjusted_rand_index([0, 0, 1, 2], [0, 0, 1, 1]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 1, 1], [0, 0, 1, 2]) == pytest.approx(4 / 7)
    assert adjusted_rand_index([0, 0, 0, 0], [0, 1, 2, 3]) == pytest.approx(0.0)
    independent = adjusted_rand_index(rng.integers(0, 4, 20_000), rng.integers(0, 4, 20_000))
    assert abs(independent) < 0.01


def test_matched_agreement_recovers_permutation():
    rng = np.random.default_rng(5)
    a = rng.integers(0, 5, size=1000)
    perm = np.array([3, 0, 4, 1, 2])  # run b calls expert i of run a "perm[i]"
    b = perm[a]
    noisy = rng.random(1000) < 0.1
    b[noisy] = rng.integers(0, 5, size=noisy.sum())
    ari, accuracy, mapping = matched_agreement(a, b)
    assert mapping == {int(perm[i]): i for i in range(5)}
    expected_accuracy = np.mean(np.array([mapping[x] for x in b]) == a)
    assert accuracy == pytest.approx(expected_accuracy) and 0.88 < accuracy < 0.95
    assert ari == pytest.approx(adjusted_rand_index(a, b))


def test_matched_agreement_unequal_number_of_experts():
    a = np.array([0, 0, 1, 1, 2, 2])
    b = np.array([5, 5, 7, 7, 7, 7])  # run b merged experts 1 and 2 of run a
    _, accuracy, mapping = matched_agreement(a, b)
    assert mapping[5] == 0 and mapping[7] in (1, 2)
    assert accuracy == pytest.approx(4 / 6)
