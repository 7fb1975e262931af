"""Attention mass λ on generation runs: per site (encoder self-attention, decoder self-attention,
cross-attention) on tiny random BART and T5, per layer on a decoder routed from its prompt, each against a
softmax over [prefix, tokens] computed by hand here from the bank and the routing."""

import math

import numpy as np
import pytest
import torch
from conftest import tiny_llama
from test_seq2seq import BUILDERS, VOCAB, batch, reference_prefixes, site_of, spread
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from moe_prefix import PrefixConfig, attach
from moe_prefix.analysis.probes import key_distance, mass_by_site, prefix_attention_mass
from moe_prefix.injection import SEQ2SEQ_MIN_TRANSFORMERS, seq2seq_supported

pytestmark = pytest.mark.skipif(
    not seq2seq_supported(), reason=f"encoder-decoder prefixes need transformers >= {SEQ2SEQ_MIN_TRANSFORMERS}"
)

torch.set_num_threads(1)

RECORDER = "moe_prefix_test_mass_recorder"
_where: dict[int, object] = {}  # id(module) -> its (site, layer) or layer
_prefix: dict[object, tuple[torch.Tensor, ...]] = {}  # (site, layer) or layer -> keys, values (b h p d), bias (b p)
_mass: dict[object, torch.Tensor] = {}  # (site, layer) or layer -> (b h q p) attention on the prefix positions


def _recording_attention(module, query, key, value, mask, scaling=None, position_bias=None, **kwargs):
    """softmax([q k_p^T * s + bias_p, q k^T * s + position_bias + mask]) [v_p; v] in float64; keeps the weights
    of the prefix columns.

    The prefix columns get the prefix bias (log weights, log length mask) and no position bias; the real columns
    exactly what the frozen model gives them.
    """
    groups = query.shape[1] // key.shape[1]
    q, k, v = query.double(), key.double().repeat_interleave(groups, 1), value.double().repeat_interleave(groups, 1)
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.einsum("bhqd,bhtd->bhqt", q, k) * scale
    if position_bias is not None:
        scores = scores + position_bias.double()
    n_q, n_t = q.shape[2], k.shape[2]
    if mask is None and module.is_causal and n_q > 1:
        mask = torch.ones(n_q, n_t, dtype=torch.bool).tril(n_t - n_q)[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    where = _where.get(id(module))
    if where in _prefix:
        keys, values, bias = (x.double() for x in _prefix[where])
        prefix_scores = torch.einsum("bhqd,bhpd->bhqp", q, keys.repeat_interleave(groups, 1)) * scale
        scores = torch.cat([prefix_scores + bias[:, None, None, :], scores], -1)
        v = torch.cat([values.repeat_interleave(groups, 1), v], 2)
        _mass[where] = scores.softmax(-1)[..., : bias.shape[1]]
    out = torch.einsum("bhqt,bhtd->bhqd", scores.softmax(-1), v)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


AttentionInterface.register(RECORDER, _recording_attention)
AttentionMaskInterface.register(RECORDER, sdpa_mask)


def _recording_model(model, rows, kv, bias, where_of):
    """The frozen backbone on the recording attention; row r of kv (b r c h p d) prefixes module rows[r]."""
    model.set_attn_implementation(RECORDER)
    _where.clear(), _prefix.clear(), _mass.clear()
    for name, module in model.named_modules():
        where = where_of(name, module)
        if where is not None:
            _where[id(module)] = where
            if where in rows:
                _prefix[where] = (kv[:, rows.index(where), 0], kv[:, rows.index(where), 1], bias)
    return model


def _real_mean(mass: torch.Tensor, query_mask: torch.Tensor) -> torch.Tensor:
    """(b h q p) -> (b h p): the mean over each example's real queries."""
    real = query_mask.double()[:, None, :, None]
    return (mass * real).sum(2) / real.sum(2)


def _teacher_forced(pad_side: str):
    """Encoder input, labels (right-padded with -100, rows of 5, 3 and 2 tokens), and the decoder input by hand."""
    ids, mask, targets = batch(pad_side)
    labels = targets.clone()
    labels[1, 3:] = -100
    labels[2, 2:] = -100
    return ids, mask, labels


def _decoder_input(model, labels):
    """The labels shifted right after the decoder start token, padding where the labels have none."""
    start, pad = model.config.decoder_start_token_id, model.config.pad_token_id
    shifted = torch.cat([torch.full_like(labels[:, :1], start), labels[:, :-1]], 1)
    return shifted.masked_fill(shifted == -100, pad)


CASES = [  # combine, sites, encoder padding, shared_len
    ("blend", ("encoder", "decoder", "cross"), "right", 0),
    ("concat", ("encoder", "decoder", "cross"), "left", 0),
    ("concat", ("decoder", "cross"), "right", 2),
]


@pytest.mark.parametrize("combine,sites,pad_side,shared_len", CASES)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_mass_per_site_matches_hand_written_softmax(name, combine, sites, pad_side, shared_len):
    cfg = PrefixConfig(
        num_experts=3, prefix_len=3, top_k=2, combine=combine, sites=sites, router_noise=0.0, shared_len=shared_len
    )
    mixture = attach(BUILDERS[name](), cfg).eval()
    spread(mixture)
    ids, mask, labels = _teacher_forced(pad_side)
    result = prefix_attention_mass(
        mixture, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], progress=False
    )
    rows = mixture.rows
    assert [(s, int(i)) for s, i in zip(result["sites"], result["site_layers"], strict=True)] == rows
    with torch.no_grad():
        routing, _ = mixture.prepare(ids, mask)
        kv, bias = reference_prefixes(mixture, routing)
        if shared_len:  # [shared, routed] along the positions; the shared part at weight one (bias 0)
            shared = mixture.shared.tensor().detach()[0].expand(len(ids), -1, -1, -1, -1, -1)
            kv = torch.cat([shared, kv], -2)
            bias = torch.cat([torch.zeros(len(ids), shared_len), bias], -1)
        model = _recording_model(BUILDERS[name](), rows, kv, bias, lambda module_name, _: site_of(module_name))
        model(input_ids=ids, attention_mask=mask, decoder_input_ids=_decoder_input(model, labels))
    assert set(_mass) == set(rows)
    decoder_mask = labels != -100
    hand_total = []
    for row, (site, layer) in enumerate(rows):
        hand = _real_mean(_mass[(site, layer)], mask if site == "encoder" else decoder_mask)  # (b h p)
        hand_total.append(hand.sum(-1))
        assert 0.05 < hand.sum(-1).mean() < 0.95, (site, layer)  # a real share: not 0 == 0
        np.testing.assert_allclose(result["total"][:, row], hand.sum(-1).numpy(), rtol=1e-4, atol=1e-6)
        if shared_len:
            np.testing.assert_allclose(result["shared"][:, row], hand[..., :shared_len].sum(-1), rtol=1e-4, atol=1e-6)
        if combine == "concat":  # each routed bank's block of positions, on its expert's column
            blocks = hand[..., shared_len:].unflatten(-1, (2, 3)).sum(-1)  # (b h k)
            for i, experts in enumerate(routing.indices.tolist()):
                for j, e in enumerate(experts):
                    got = result["per_expert"][i, row, :, e]
                    np.testing.assert_allclose(got, blocks[i, :, j].numpy(), rtol=1e-4, atol=1e-6)
    per_site = mass_by_site(result)
    assert list(per_site) == list(sites)
    for site in sites:
        expected = torch.stack([t for t, (s, _) in zip(hand_total, rows, strict=True) if s == site], 1).mean(1)
        np.testing.assert_allclose(per_site[site], expected.numpy(), rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_key_distance_captures_each_sites_real_keys(name):
    """Per bank row, the real keys of the stack the site reads: decoder tokens for decoder self-attention."""
    mixture = attach(BUILDERS[name](), PrefixConfig(num_experts=2, prefix_len=3, sites=("encoder", "decoder", "cross")))
    ids, mask, labels = _teacher_forced("right")
    distance = key_distance(mixture, [{"input_ids": ids, "attention_mask": mask, "labels": labels}], progress=False)
    # 15 real encoder tokens, 10 real decoder tokens: every row keeps 10 keys (the decoder rows have no more), half
    # of them held out; a decoder row reading the encoder's mask would not even index its keys
    assert int(mask.sum()) == 15 and int((labels != -100).sum()) == 10
    assert distance.real.shape == (6, 2, 5) and distance.num_reference == 5  # (l h m)
    assert distance.prefix.shape[:2] == (2, 6) and np.isfinite(distance.real).all()


def test_seq2seq_probes_need_labels():
    mixture = attach(BUILDERS["bart"](), PrefixConfig(num_experts=2, prefix_len=3))
    ids, mask, _ = batch("right")
    with pytest.raises(ValueError, match="labels"):
        prefix_attention_mass(mixture, [{"input_ids": ids, "attention_mask": mask}], progress=False)


def test_decoder_generation_mass_routes_from_the_prompt_and_averages_every_real_token():
    """A decoder generation batch: prompt + target, routed from the prompt alone (router_input_ids)."""
    cfg = PrefixConfig(num_experts=3, prefix_len=3, routing="soft", top_k=None, router_noise=0.0)
    mixture = attach(tiny_llama(), cfg).eval()
    spread(mixture)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, VOCAB, (3, 8), generator=g)
    mask = torch.ones_like(ids)
    mask[1, 6:], mask[2, 4:] = 0, 0  # right-padded pairs
    router_ids, router_mask = ids[:, :3], torch.ones(3, 3, dtype=torch.long)  # the prompts: 3 tokens each
    batch_ = {
        "input_ids": ids,
        "attention_mask": mask,
        "router_input_ids": router_ids,
        "router_attention_mask": router_mask,
    }
    result = prefix_attention_mass(mixture, [batch_], progress=False)
    assert result["sites"] is None and result["total"].shape == (3, 2, 4)  # (n l h): query heads
    with torch.no_grad():
        routing, _ = mixture.prepare(router_ids, router_mask)
        kv, bias = reference_prefixes(mixture, routing)
        layer_of = lambda _name, module: getattr(module, "layer_idx", None)  # noqa: E731
        model = _recording_model(tiny_llama(), [0, 1], kv, bias, layer_of)
        positions = (mask.cumsum(-1) - 1).clamp_min(0)  # real tokens count from 0, as the mixture places them
        model(input_ids=ids, attention_mask=mask, position_ids=positions)
    for layer in range(2):
        hand = _real_mean(_mass[layer], mask).sum(-1)
        np.testing.assert_allclose(result["total"][:, layer], hand.numpy(), rtol=1e-4, atol=1e-6)
    assert 0.05 < result["total"].mean() < 0.95
