"""Router and auxiliary losses, lengths and configuration checks."""

import numpy as np
import pytest
import torch

from moe_prefix import PrefixConfig, detect_collapse, load_balance_loss, router_z_loss
from moe_prefix.length import LengthController
from moe_prefix.router import Router


def test_topk_weights_are_renormalised_and_sparse():
    torch.manual_seed(0)
    router = Router(8, PrefixConfig(num_experts=5, top_k=2)).eval()
    out = router(torch.randn(6, 8))
    assert out.indices.shape == (6, 2)
    assert torch.allclose(out.weights.sum(-1), torch.ones(6))
    assert (out.weights > 0).sum(-1).eq(2).all()
    assert torch.allclose(out.weights.gather(1, out.indices), out.topk_weights)
    # Without noise the chosen banks are the top logits.
    assert torch.equal(out.indices, out.logits.topk(2).indices)


def test_router_noise_only_in_training():
    torch.manual_seed(0)
    router = Router(8, PrefixConfig(num_experts=8, top_k=1, router_noise=5.0))
    x = torch.randn(64, 8)
    router.eval()
    assert torch.equal(router(x).indices, router(x).indices)
    router.train()
    assert not torch.equal(router(x).indices, router(x).indices)


def test_soft_routing_is_dense_softmax_with_temperature():
    torch.manual_seed(0)
    router = Router(8, PrefixConfig(num_experts=3, routing="soft", temperature=2.0)).eval()
    out = router(torch.randn(4, 8))
    assert torch.allclose(out.weights, torch.softmax(out.logits / 2.0, -1))
    assert torch.equal(out.indices, torch.arange(3).expand(4, 3))


def test_load_balance_is_one_when_uniform_and_larger_when_collapsed():
    e = 4
    uniform = torch.full((8, e), 1 / e)
    spread = torch.arange(8)[:, None] % e
    assert torch.isclose(load_balance_loss(uniform, spread, e), torch.tensor(1.0))
    collapsed = torch.zeros(8, e)
    collapsed[:, 0] = 1
    assert load_balance_loss(collapsed, torch.zeros(8, 1, dtype=torch.long), e) == e


def test_load_balance_ignores_padding_rows():
    e = 2
    probs = torch.tensor([[0.5, 0.5], [0.5, 0.5], [1.0, 0.0]])
    idx = torch.tensor([[0], [1], [0]])
    mask = torch.tensor([True, True, False])
    assert torch.isclose(load_balance_loss(probs, idx, e, mask), torch.tensor(1.0))


def test_z_loss_formula():
    logits = torch.tensor([[0.0, 0.0], [1.0, 2.0]])
    expected = (torch.logsumexp(logits, -1) ** 2).mean()
    assert torch.isclose(router_z_loss(logits), expected)


def test_soft_length_mask_formula_and_hard_truncation():
    cfg = PrefixConfig(
        num_experts=2,
        prefix_len=6,
        top_k=1,
        length="expert",
        expert_lengths=(2, 5),
        length_tau=0.5,
        router_init="random",
    )
    ctrl = LengthController(4, cfg)
    router = Router(4, cfg).eval()
    route = router(torch.randn(3, 4))
    ctrl.train()
    out = ctrl(torch.randn(3, 4), route, "concat")
    lengths = torch.tensor([2.0, 5.0])[route.indices]
    i = torch.arange(6.0)
    assert torch.allclose(out.log_mask, torch.sigmoid((lengths[..., None] - i - 0.5) / 0.5).log())
    ctrl.eval()
    out = ctrl(torch.randn(3, 4), route, "concat")
    assert out.keep == int(lengths.max())
    assert torch.equal(torch.isfinite(out.log_mask), torch.arange(out.keep) < lengths[..., None])


@pytest.mark.parametrize(
    "kwargs,message",
    [
        ({"top_k": 5, "num_experts": 4}, "top_k"),
        ({"prefix_len": 0}, "prefix_len"),
        ({"routing": "dense"}, "soft, topk"),
        ({"length": "expert"}, "expert_lengths"),
    ],
)
def test_config_rejects_bad_values_naming_the_key(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixConfig(**kwargs)


def test_top1_router_receives_task_gradient():
    """With k=1 the renormalised weight is 1; the straight-through estimator still trains the router."""
    torch.manual_seed(0)
    router = Router(8, PrefixConfig(num_experts=4, top_k=1, balance_coef=0.0, z_coef=0.0)).eval()
    out = router(torch.randn(5, 8))
    assert torch.allclose(out.topk_weights, torch.ones(5, 1))
    (out.topk_weights * torch.randn(5, 1)).sum().backward()
    assert router.proj.weight.grad.abs().sum() > 0


def test_one_expert_router_adds_no_loss_and_takes_no_gradient():
    """One expert takes every input with weight 1, so no routing loss may train it: after a one-centroid k-means
    init its logit is large (the z-loss grows with its square) and that gradient set the clipping of the prefix's."""
    torch.manual_seed(0)
    router = Router(16, PrefixConfig(num_experts=1, top_k=1, router_init="kmeans")).train()
    features = torch.randn(64, 16) + 3.0 * torch.randn(16)  # a direction all inputs share, as mean embeddings do
    router.init_from_kmeans(features)
    out = router(features)
    assert out.logits.abs().min() > 5  # the init that made the z-loss large
    assert torch.equal(out.weights, torch.ones(64, 1))
    assert out.aux_loss.item() == out.z_loss.item() == out.balance_loss.item() == 0.0
    (out.aux_loss + (out.weights * torch.randn(64, 1)).sum()).backward()
    assert router.proj.weight.grad is None or not router.proj.weight.grad.any()


def test_detect_collapse():
    report = detect_collapse(np.array([0.95, 0.03, 0.02]))
    assert report and report.expert == 0 and report.share == pytest.approx(0.95)
    balanced = detect_collapse(np.array([30, 40, 30]))  # counts are fine too
    assert not balanced and balanced.expert == 1 and balanced.share == pytest.approx(0.4)
    assert detect_collapse(np.array([0.1, 0.6, 0.3]), threshold=0.5).expert == 1


def test_detect_collapse_takes_tensors_and_lists_alike():
    load = torch.tensor([0.125, 0.75, 0.125], dtype=torch.bfloat16, requires_grad=True)  # exact in bf16
    report = detect_collapse(load, threshold=0.7)
    assert report == detect_collapse([0.125, 0.75, 0.125], 0.7) == detect_collapse(np.array([1, 6, 1]), 0.7)
    assert report and report.expert == 1 and report.share == 0.75
    for bad in ([], [[0.5, 0.5]], [0.5, -0.1], [0, 0]):
        with pytest.raises(ValueError, match="load must be"):
            detect_collapse(bad)


def test_by_group_router_is_a_fixed_oracle_that_training_cannot_move():
    cfg = PrefixConfig(
        num_experts=4, top_k=1, router_input="group", num_groups=3, router_init="by_group", balanced_routing=False
    )
    router = Router(3, cfg).train()
    assert not router.proj.weight.requires_grad
    groups = torch.tensor([2, 0, 1, 2, 1])
    out = router(torch.nn.functional.one_hot(groups, 3).float())
    assert torch.equal(out.indices[:, 0], groups)  # group g on expert g, training noise and all
    assert torch.equal(out.topk_weights, torch.ones(5, 1))
    assert out.z_loss < 1e-20  # no constant added to the training loss
    assert [p for p in router.parameters() if p.requires_grad] == []


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"top_k": 2, "balanced_routing": False}, "prefix.top_k=2"),
        ({"top_k": 1}, "prefix.balanced_routing=True"),
        ({"top_k": 1, "balanced_routing": False, "router_input": "embeddings"}, "prefix.router_input=embeddings"),
    ],
)
def test_by_group_router_names_the_settings_it_needs(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PrefixConfig(num_experts=4, num_groups=4, router_init="by_group", **{"router_input": "group", **kwargs})


def test_by_group_router_needs_an_expert_per_group():
    cfg = PrefixConfig(
        num_experts=2, top_k=1, router_input="group", num_groups=3, router_init="by_group", balanced_routing=False
    )
    with pytest.raises(ValueError, match="num_experts to at least 3"):
        Router(3, cfg)
