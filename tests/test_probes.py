"""Probes: λ from the attention path equals softmax attention computed by hand; geometry shapes."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import batch, tiny_bert, tiny_llama
from einops import rearrange

from moe_prefix import PrefixConfig, attach
from moe_prefix.analysis.geometry import linear_cka
from moe_prefix.analysis.probes import key_distance, mean_by_group, prefix_attention_mass, prefix_key_geometry

torch.set_num_threads(1)

E, P, K = 3, 4, 2


def _mixture(combine: str, **overrides):
    cfg = PrefixConfig(
        num_experts=E, prefix_len=P, top_k=K, combine=combine, init_std=1.0, router_noise=0.0, **overrides
    )
    torch.manual_seed(1)
    return attach(tiny_bert(), cfg).eval()


def _batches(groups=(0, 1, 0)):
    ids, mask = batch(b=3, t=9)
    g = torch.tensor(groups)
    return [{"input_ids": ids, "attention_mask": mask, "group_ids": g, "has_group": g >= 0, "index": g * 0}]


def _manual_mass(mixture, ids, mask, layer: int) -> torch.Tensor:
    """Per-head prefix mass (b h k) of one layer, from the layer's input by hand, in float64."""
    attn = mixture.backbone.bert.encoder.layer[layer].attention.self
    seen = {}

    def grab(_module, args, kwargs):
        seen["hidden"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]

    handle = attn.register_forward_pre_hook(grab, with_kwargs=True)
    with torch.no_grad():
        mixture(input_ids=ids, attention_mask=mask)
    handle.remove()
    routing = mixture.last_routing
    hidden = seen["hidden"].double()
    heads = attn.config.num_attention_heads

    def project(linear):
        out = F.linear(hidden, linear.weight.double(), linear.bias.double())
        return rearrange(out, "b t (h d) -> b h t d", h=heads)

    q, k = project(attn.query), project(attn.key)
    bank = mixture.bank.tensor().detach().double()[:, layer, 0]  # (e h p d)
    if mixture.cfg.combine == "blend":
        prefix = torch.einsum("be,ehpd->bhpd", routing.weights.double(), bank)
        bias = torch.zeros(ids.shape[0], P, dtype=torch.float64)
    else:
        prefix = rearrange(bank[routing.indices], "b k h p d -> b h (k p) d")
        chosen = routing.weights.double().gather(1, routing.indices)  # (b k)
        bias = chosen.log().repeat_interleave(P, dim=1)
    keys = torch.cat([prefix, k], 2)
    scores = q @ keys.transpose(-1, -2) / math.sqrt(q.shape[-1])
    scores[..., : bias.shape[1]] += bias[:, None, None, :]
    scores[..., bias.shape[1] :] = scores[..., bias.shape[1] :].masked_fill(~mask.bool()[:, None, None, :], -math.inf)
    weights = scores.softmax(-1)[..., : bias.shape[1]]  # (b h q p)
    blocks = weights.unflatten(-1, (-1, P)).sum(-1)  # (b h q k)
    real = mask.double()[:, None, :, None]
    return (blocks * real).sum(2) / real.sum(2)


@pytest.mark.parametrize("combine", ["blend", "concat"])
def test_lambda_matches_manual_softmax_attention(combine):
    mixture = _mixture(combine)
    batches = _batches()
    ids, mask = batches[0]["input_ids"], batches[0]["attention_mask"]
    result = prefix_attention_mass(mixture, batches, progress=False)
    assert result["total"].shape == (3, 2, 4)  # (n l h)
    for layer in range(2):
        manual = _manual_mass(mixture, ids, mask, layer).numpy()  # (b h k)
        np.testing.assert_allclose(result["total"][:, layer], manual.sum(-1), rtol=1e-4, atol=1e-6)
        if combine == "concat":
            per_expert = result["per_expert"][:, layer]  # (n h e)
            for i in range(3):
                for j, e in enumerate(result["experts"][i]):
                    np.testing.assert_allclose(per_expert[i, :, e], manual[i, :, j], rtol=1e-4, atol=1e-6)
                unrouted = sorted(set(range(E)) - set(result["experts"][i].tolist()))
                assert np.isnan(per_expert[i, :, unrouted]).all()
    assert 0.05 < result["total"].mean() < 0.95  # a non-trivial share: the check above is not 0 == 0
    if combine == "blend":
        assert result["per_expert"] is None


def test_lambda_concat_per_expert_sums_to_total_and_groups():
    mixture = _mixture("concat")
    result = prefix_attention_mass(mixture, _batches(groups=(0, 1, -1)) * 2, max_examples=5, progress=False)
    assert result["total"].shape == (5, 2, 4) and result["per_expert"].shape == (5, 2, 4, E)
    np.testing.assert_allclose(np.nansum(result["per_expert"], -1), result["total"], rtol=1e-5)
    assert result["group_ids"].tolist() == [0, 1, -1, 0, 1]
    means = mean_by_group(result["total"], result["group_ids"], num_groups=3)
    assert means.shape == (3, 2, 4) and np.isnan(means[2]).all()
    np.testing.assert_allclose(means[1], result["total"][[1, 4]].mean(0))


def test_lambda_on_grouped_query_attention_has_query_heads():
    torch.manual_seed(1)
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=2, prefix_len=3, top_k=1, combine="concat")).eval()
    ids, mask = batch(b=2, t=7, pad_side="left")
    result = prefix_attention_mass(mixture, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert result["total"].shape == (2, 2, 4)  # 4 query heads share 2 key/value heads
    assert (result["group_ids"] == -1).all()


def test_geometry_shapes():
    mixture = _mixture("blend")
    with torch.no_grad():
        mixture.bank.kv[0, 1, 0] = 0.5  # expert 0's layer-1 keys are constant: nothing to compare, CKA is NaN
    geo = prefix_key_geometry(mixture)
    assert geo.key_rank.shape == geo.value_rank.shape == (E, 2, 4)  # (e l h)
    assert geo.key_cka.shape == (2, E, E)  # (l e e)
    keys = rearrange(mixture.bank.tensor().detach().double()[:, :, 0].numpy(), "e l h p d -> l e (h d) p")
    expected = np.array([[[linear_cka(x, y) for y in layer] for x in layer] for layer in keys])
    np.testing.assert_allclose(geo.key_cka, expected, rtol=1e-12)  # NaN exactly where the pairwise CKA is NaN
    np.testing.assert_array_equal(geo.key_cka, geo.key_cka.transpose(0, 2, 1))
    np.testing.assert_allclose(np.diagonal(geo.key_cka[0]), 1.0, atol=1e-6)
    assert np.isnan(geo.key_cka[1, 0]).all() and np.isnan(geo.key_cka[1, :, 0]).all()
    assert 0.0 < geo.key_cka[0, 0, 1] < 0.99  # random banks are not alike: the diagonal is not the whole story
    assert geo.key_angles.shape == (2, 4, E, E, 4)  # (l h e e r), r = min(p, d // 2) = 4
    assert (geo.key_angles >= 0).all() and (geo.key_angles <= np.pi / 2 + 1e-9).all()
    assert ((1 <= geo.key_rank) & (geo.key_rank <= P)).all()

    distance = key_distance(mixture, _batches(), progress=False)
    assert distance.prefix.shape == distance.prefix_cosine.shape == (E, 2, 4, P)  # (e l h p)
    n = int(_batches()[0]["attention_mask"].sum())
    assert distance.real.shape == (2, 4, n - n // 2) and distance.num_reference == n // 2  # (l h m)
    assert np.isfinite(distance.prefix).all() and np.isfinite(distance.real).all()


def test_decoupled_mode_has_no_lambda():
    mixture = _mixture("blend", prefix_mode="decoupled")
    with pytest.raises(ValueError, match="decoupled"):
        prefix_attention_mass(mixture, _batches(), progress=False)
