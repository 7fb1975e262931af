"""Router recipes against dead experts: k-means initialisation, balanced routing, router learning rate,
and the dead-expert and NMI metrics."""

import math

import numpy as np
import pytest
import torch
from conftest import VOCAB, tiny_bert, tiny_llama, tiny_run_overrides

from moe_prefix import PrefixConfig, attach
from moe_prefix.analysis.routing_stats import normalized_mutual_info
from moe_prefix.router import Router, balanced_topk, kmeans
from moe_prefix.train.module import routing_metrics
from moe_prefix.train.run_config import ConfigError, load_config


def _clustered_batches(num_clusters: int, per_cluster: int = 12, t: int = 8, seed: int = 0):
    """Inputs whose tokens come from disjoint vocabulary ranges: E well-separated clusters of mean embeddings."""
    g = torch.Generator().manual_seed(seed)
    width = (VOCAB - 1) // num_clusters
    ids = torch.cat(
        [torch.randint(1 + c * width, 1 + (c + 1) * width, (per_cluster, t), generator=g) for c in range(num_clusters)]
    )
    clusters = torch.arange(num_clusters).repeat_interleave(per_cluster)
    return [{"input_ids": ids, "attention_mask": torch.ones_like(ids)}], clusters


def _kmeans_mixture(num_experts=4, seed=0, **overrides):
    """A mixture whose vocabulary ranges (see _clustered_batches) embed along distinct directions."""
    torch.manual_seed(seed)
    cfg = PrefixConfig(num_experts=num_experts, prefix_len=2, top_k=1, router_init="kmeans", **overrides)
    model = tiny_bert()
    embeddings = model.get_input_embeddings().weight
    width = (VOCAB - 1) // num_experts
    with torch.no_grad():
        for c in range(num_experts):
            embeddings[1 + c * width : 1 + (c + 1) * width] += 3.0 * torch.eye(embeddings.shape[1])[c]
    return attach(model, cfg).eval()


def test_kmeans_recovers_separated_clusters_deterministically():
    g = torch.Generator().manual_seed(1)
    centres = torch.randn(5, 6, generator=g) * 20
    x = torch.cat([centres[i] + torch.randn(30, 6, generator=g) for i in range(5)])
    truth = torch.arange(5).repeat_interleave(30)
    _, a = kmeans(x, 5, seed=3)
    _, b = kmeans(x, 5, seed=3)
    assert torch.equal(a, b)
    assert normalized_mutual_info(a.numpy(), truth.numpy()) == pytest.approx(1.0)


def test_kmeans_router_sends_each_cluster_to_its_own_expert_before_training():
    batches, clusters = _clustered_batches(4)
    mixture = _kmeans_mixture(4)
    assigned = mixture.init_router_kmeans(batches, seed=0)
    with torch.no_grad():
        routing, _ = mixture.prepare(batches[0]["input_ids"], batches[0]["attention_mask"])
    top1 = routing.indices[:, 0]
    # every cluster goes to exactly one expert, and different clusters to different experts
    per_cluster = [set(top1[clusters == c].tolist()) for c in range(4)]
    assert all(len(s) == 1 for s in per_cluster)
    assert len(set.union(*per_cluster)) == 4
    assert torch.equal(top1, assigned)


def test_kmeans_router_is_deterministic_given_the_seed_and_differs_across_seeds():
    batches, _ = _clustered_batches(4, per_cluster=6)
    weights = []
    for seed in (0, 0, 5):
        mixture = _kmeans_mixture(4)
        mixture.init_router_kmeans(batches, seed=seed)
        weights.append(mixture.router.proj.weight.detach().clone())
    assert torch.equal(weights[0], weights[1])
    assert not torch.equal(weights[0], weights[2])


def test_kmeans_needs_the_biased_router():
    router = Router(8, PrefixConfig(num_experts=2, router_init="random"))
    with pytest.raises(ValueError, match="router_init=kmeans"):
        router.init_from_kmeans(torch.randn(10, 8))
    with pytest.raises(ValueError, match="router_input=group"):
        PrefixConfig(router_init="kmeans", router_input="group", num_groups=3)


@pytest.mark.parametrize("b, e, k", [(64, 4, 1), (33, 4, 1), (32, 8, 2), (64, 4, 2)])
def test_balanced_topk_spreads_a_batch_that_prefers_one_expert(b, e, k):
    scores = torch.zeros(b, e)
    scores[:, 0] = 5.0  # every input would pick expert 0 first
    indices = balanced_topk(scores, k)
    counts = torch.bincount(indices.flatten(), minlength=e)
    assert all(len(set(row)) == k for row in indices.tolist())  # k distinct experts per input
    if k == 1:  # exact: at most ceil(b/e) each
        assert counts.max() <= math.ceil(b / e) and counts.min() >= b - (e - 1) * math.ceil(b / e)
    else:  # within 15 % of an even share (plain top-k would give expert 0 all b slots)
        assert 0.85 * b * k / e <= counts.min() and counts.max() <= 1.15 * b * k / e


def test_balanced_routing_only_in_training_and_weights_still_carry_gradient():
    torch.manual_seed(0)
    cfg = PrefixConfig(num_experts=4, top_k=1, balanced_routing=True, router_noise=0.0)
    router = Router(8, cfg, normalize=False)
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[0] += 1.0  # a router that sends everything to expert 0
    x = torch.randn(40, 8).abs() + 0.1
    router.eval()
    assert router(x).indices.unique().tolist() == [0]
    router.train()
    out = router(x)
    assert torch.bincount(out.indices.flatten(), minlength=4).tolist() == [10, 10, 10, 10]
    # straight-through top-1 weight: value 1, gradient of log p reaches the router
    (out.weights * torch.randn_like(out.weights)).sum().backward()
    assert router.proj.weight.grad.abs().sum() > 0


def test_router_gets_its_own_learning_rate(tmp_path):
    from moe_prefix.train.classification import ClassificationModule
    from moe_prefix.train.networks import SequenceClassifier

    cfg = load_config(None, ["optim.schedule=constant", "optim.lr=0.01", "optim.router_lr=0.123", "optim.head_lr=0.5"])
    network = SequenceClassifier(tiny_bert().bert, 2, cfg.model, PrefixConfig(num_experts=2, prefix_len=2, top_k=1))
    module = ClassificationModule(network, cfg, num_classes=2, group_names=[])
    optimizer = module.configure_optimizers()
    named = {id(p): n for n, p in network.named_parameters()}
    by_lr = {g["lr"]: sorted(named[id(p)] for p in g["params"]) for g in optimizer.param_groups}
    assert set(by_lr) == {0.01, 0.123, 0.5}
    assert by_lr[0.123] and all(".router." in f".{n}" for n in by_lr[0.123])
    assert all(n.startswith("head.") for n in by_lr[0.5])
    assert not any(".router." in f".{n}" or n.startswith("head.") for n in by_lr[0.01])
    assert sum(len(v) for v in by_lr.values()) == sum(p.requires_grad for p in network.parameters())


def _rows(top1, groups, num_experts=4):
    rows = []
    for i, (e, g) in enumerate(zip(top1, groups, strict=True)):
        weights = [0.0] * num_experts
        weights[e] = 1.0
        rows.append({"index": i, "weights": weights, "experts": [e], "prefix_len": 4.0, "group": g})
    return rows


def test_dead_experts_and_nmi_in_validation_metrics():
    top1 = [0, 0, 1, 1, 0, 0, 1, 1]
    groups = [0, 0, 1, 1, 0, 0, 1, 1]
    metrics = routing_metrics(_rows(top1, groups), 4)
    assert metrics["val/dead_experts"] == 2  # experts 2 and 3 never chosen
    assert metrics["val/nmi"] == pytest.approx(1.0)
    shuffled = routing_metrics(_rows([0, 1, 2, 3, 0, 1, 2, 3], groups), 4)
    assert shuffled["val/dead_experts"] == 0
    assert shuffled["val/nmi"] == pytest.approx(normalized_mutual_info(np.array([0, 1, 2, 3] * 2), np.array(groups)))
    no_groups = routing_metrics(_rows(top1, [-1] * 8), 4)
    assert "val/nmi" not in no_groups


def test_prompt_tuning_initialisation_follows_the_seed():
    from moe_prefix.train.networks import SoftPrompt

    prompts = []
    for seed in (0, 0, 1):
        backbone = tiny_bert().bert  # (seeds itself)
        torch.manual_seed(seed)
        prompts.append(SoftPrompt(backbone, 4).prompt.detach().clone())
    assert torch.equal(prompts[0], prompts[1]) and not torch.equal(prompts[0], prompts[2])


@pytest.mark.parametrize("make", [tiny_bert, tiny_llama])
def test_candidate_router_features_are_what_each_router_input_computes(make):
    """One pass gives, for every choice of router input, exactly the features that choice routes on."""
    ids = torch.randint(5, VOCAB, (3, 7), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0  # padding must not count
    candidates = attach(make(), PrefixConfig(num_experts=2, prefix_len=2, top_k=1)).candidate_router_features(ids, mask)
    assert list(candidates) == ["embeddings", "hidden1", "hidden2"]
    for name, got in candidates.items():
        option = (
            {"router_input": "embeddings"}
            if name == "embeddings"
            else {"router_input": "hidden", "router_layer": int(name.removeprefix("hidden"))}
        )
        mixture = attach(make(), PrefixConfig(num_experts=2, prefix_len=2, top_k=1, **option))
        torch.testing.assert_close(got, mixture.router_features(ids, mask), rtol=0, atol=0, msg=name)


def test_router_features_command_compares_each_input_with_the_groups(tiny_backbone_dir, reviews_csv, tmp_path):
    from moe_prefix.tools.router_features import group_separation, markdown_table

    cfg = load_config(None, tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "run"))
    rows = group_separation(cfg, seeds=2)
    assert [r["router_input"] for r in rows] == ["embeddings", "hidden1", "hidden2"]
    assert all(0 <= r["nmi_min"] <= r["nmi_mean"] <= r["nmi_max"] <= 1 for r in rows)
    assert all(0 <= r["linear_nmi"] <= 1 and 0 <= r["linear_accuracy"] <= 1 for r in rows)
    assert "`prefix.router_input=hidden prefix.router_layer=2`" in markdown_table(rows, cfg, 2)
    assert not (tmp_path / "run").exists()  # a diagnostic: no run directory
    no_groups = load_config(
        None, tiny_run_overrides(tiny_backbone_dir, reviews_csv, tmp_path / "run", **{"data.group_column": "null"})
    )
    with pytest.raises(ConfigError, match="set data.group_column"):
        group_separation(no_groups)
    rows = group_separation(cfg, seeds=1, transforms=("layernorm", "whiten"))
    pairs = [(r["router_input"], r["features"]) for r in rows]
    assert pairs[:3] == [("embeddings", "layernorm"), ("embeddings", "whiten"), ("hidden1", "layernorm")]
    with pytest.raises(ConfigError, match="unknown feature transform 'pca'"):
        group_separation(cfg, transforms=("pca",))


def test_whitening_matches_numpys_principal_components():
    """whiten(x, k): the projections on the covariance's top-k eigenvectors (numpy's eigh), at unit variance."""
    from moe_prefix.tools.router_features import spherical, whiten

    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 6)) @ rng.normal(size=(6, 6)) + 3.0
    got = whiten(torch.tensor(x), 3).numpy()
    values, vectors = np.linalg.eigh(np.cov(x, rowvar=False))
    top = vectors[:, ::-1][:, :3]
    want = (x - x.mean(0)) @ top / np.sqrt(values[::-1][:3])
    np.testing.assert_allclose(np.abs(got), np.abs(want), atol=1e-8)  # an eigenvector's sign is arbitrary
    np.testing.assert_allclose(np.cov(got, rowvar=False), np.eye(3), atol=1e-8)
    unit = spherical(torch.tensor(x)).numpy()
    np.testing.assert_allclose(np.linalg.norm(unit, axis=1), 1.0)
    np.testing.assert_allclose(unit * np.linalg.norm(x - x.mean(0), axis=1, keepdims=True), x - x.mean(0))


def test_balance_loss_is_inert_under_balanced_routing_unless_it_counts_the_routers_own_choices():
    """Balanced routing gives every expert the same share of slots, so the Switch loss E * sum f_e P_e
    equals sum P_e = 1 and has no gradient; balance_free_choices counts the router's own top-k instead,
    which is the loss plain top-k routing would compute on the same logits."""
    torch.manual_seed(0)
    x = torch.randn(64, 8)

    def balance(**options):
        cfg = PrefixConfig(num_experts=4, top_k=1, router_noise=0.0, **options)
        router = Router(8, cfg, normalize=False)
        with torch.no_grad():
            router.proj.weight.copy_(torch.randn(4, 8, generator=torch.Generator().manual_seed(1)))
            router.proj.weight[0] += 2.0  # a router that prefers expert 0
        router.train()
        out = router(x)
        out.balance_loss.backward()
        return out.balance_loss.detach(), router.proj.weight.grad

    inert, inert_grad = balance(balanced_routing=True, balance_free_choices=False)
    assert inert.item() == pytest.approx(1.0, abs=1e-6) and inert_grad.abs().max() < 1e-6
    free, free_grad = balance(balanced_routing=True, balance_free_choices=True)
    plain, plain_grad = balance(balanced_routing=False, balance_free_choices=False)
    assert free.item() > 1.2 and free_grad.abs().max() > 1e-3
    torch.testing.assert_close(free, plain)
    torch.testing.assert_close(free_grad, plain_grad)
    # Without balanced routing the loss counts the router's own choices anyway: the option changes nothing.
    alone, alone_grad = balance(balanced_routing=False, balance_free_choices=True)
    torch.testing.assert_close(alone, plain)
    torch.testing.assert_close(alone_grad, plain_grad)


def test_defaults_are_the_recipe_and_fall_back_where_kmeans_has_nothing_to_cluster():
    cfg = PrefixConfig()
    assert (cfg.router_init, cfg.balanced_routing, cfg.balance_free_choices, cfg.balance_coef) == (
        "kmeans",
        True,
        True,
        0.1,
    )
    assert PrefixConfig(num_experts=1, top_k=1).router_init == "random"
    assert PrefixConfig(router_input="group", num_groups=3).router_init == "random"
    with pytest.raises(ValueError, match="router_input=group use random"):
        PrefixConfig(router_input="group", num_groups=3, router_init="kmeans")
