"""Prefix attention against references nobody here wrote: PEFT's cache route, and attention by hand."""

import math

import pytest
import torch
from conftest import FAMILIES, batch, tiny_bert, tiny_gpt2, tiny_llama
from einops import rearrange

from moe_prefix import PrefixConfig, attach
from moe_prefix.injection import STATE_KWARG


def max_diff(a, b, mask):
    """Largest difference on real tokens (per-token logits) or per example (classifier logits)."""
    diff = (a - b).abs()
    return (diff[mask.bool()] if diff.dim() == 3 else diff).max().item()


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_zero_length_prefix_equals_untouched_backbone(name):
    ids, mask = batch(pad_side="right")
    reference = FAMILIES[name]()
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=mask).logits
    cfg = PrefixConfig(num_experts=2, prefix_len=4, top_k=1, length="expert", expert_lengths=(0, 0))
    mixture = attach(FAMILIES[name](), cfg).eval()
    with torch.no_grad():
        got = mixture(input_ids=ids, attention_mask=mask).logits
    assert max_diff(got, expected, mask) <= 1e-6


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_fully_masked_prefix_in_attention_equals_backbone(name):
    """A -inf bias on every prefix position (a soft mask at its limit) leaves the model untouched."""
    ids, mask = batch(pad_side="right")
    model = FAMILIES[name]()
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask).logits
        mixture = attach(model, PrefixConfig(num_experts=1, prefix_len=3, top_k=1)).eval()
        _, state = mixture.prepare(ids, mask)
        state.bias = torch.full((ids.shape[0], 3), float("-inf"))
        got = model(input_ids=ids, attention_mask=mask, **{STATE_KWARG: state}).logits
    assert max_diff(got, expected, mask) <= 1e-6


def _peft_prefix(model, P):
    """A PEFT prefix-tuning model with random prefix, and its per-layer keys/values (l c h p d)."""
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    peft_model.eval()
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_()
        cache = peft_model.get_prompt(batch_size=1)
        kv = torch.stack([torch.stack([layer.keys[0], layer.values[0]]) for layer in cache.layers])
    return peft_model, kv


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_single_expert_matches_peft_prefix_tuning(build):
    P = 5
    ids, mask = batch(pad_side="left")
    peft_model, kv = _peft_prefix(build(), P)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    mixture = attach(peft_model.get_base_model(), PrefixConfig(num_experts=1, prefix_len=P, top_k=1)).eval()
    mixture.bank.set_from_activations(kv[None])
    # PEFT's cache route puts real tokens at positions P..P+T-1 (whatever the padding).
    positions = torch.arange(P, P + ids.shape[1]).expand_as(ids)
    with torch.no_grad():
        got = mixture(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    real = mask.bool()
    assert (got - expected)[real].abs().max().item() <= 1e-5


def _manual_attention(q, k, v, bias, key_mask, scale):
    """softmax(q k^T * scale + bias) v, one head at a time, in float64."""
    scores = torch.einsum("bhqd,bhtd->bhqt", q.double(), k.double()) * scale + bias.double()
    scores = scores.masked_fill(~key_mask[:, None, None, :], -math.inf)
    return torch.einsum("bhqt,bhtd->bhqd", scores.softmax(-1), v.double())


def _bert_layer0_inputs(model, ids, mask):
    attn = model.bert.encoder.layer[0].attention.self
    hidden = model.bert.embeddings(input_ids=ids)
    heads = lambda x: rearrange(x, "b t (h d) -> b h t d", h=attn.config.num_attention_heads)
    return attn, hidden, heads(attn.query(hidden)), heads(attn.key(hidden)), heads(attn.value(hidden))


def test_bert_prefix_matches_hand_written_eager_attention():
    torch.manual_seed(0)
    model = tiny_bert()
    mixture = attach(model, PrefixConfig(num_experts=1, prefix_len=4, top_k=1, init_std=1.0)).eval()
    ids, mask = batch(pad_side="right")
    attn, hidden, q, k, v = _bert_layer0_inputs(model, ids, mask)
    with torch.no_grad():
        _, state = mixture.prepare(ids, mask)
        mask4d = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        out = attn(hidden, attention_mask=mask4d, **{STATE_KWARG: state})[0]
        pk, pv = state.kv[:, 0, 0], state.kv[:, 0, 1]
        keys, values = torch.cat([pk, k], 2), torch.cat([pv, v], 2)
        key_mask = torch.cat([torch.ones(ids.shape[0], 4, dtype=torch.bool), mask.bool()], 1)
        expected = _manual_attention(q, keys, values, torch.zeros(()), key_mask, attn.scaling)
    expected = rearrange(expected, "b h t d -> b t (h d)")
    assert (out - expected).abs().max().item() <= 1e-5


def test_concat_equals_softmax_over_banks_with_log_weight_biases():
    """softmax over [prefix_1 ... prefix_k, inputs] with log w_j added on bank j's positions."""
    torch.manual_seed(0)
    model = tiny_bert()
    cfg = PrefixConfig(num_experts=3, prefix_len=2, top_k=2, combine="concat", init_std=1.0)
    mixture = attach(model, cfg).eval()
    torch.nn.init.normal_(mixture.router.proj.weight, std=1.0)
    ids, mask = batch(pad_side="right")
    attn, hidden, q, k, v = _bert_layer0_inputs(model, ids, mask)
    with torch.no_grad():
        routing, state = mixture.prepare(ids, mask)
        mask4d = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        out = attn(hidden, attention_mask=mask4d, **{STATE_KWARG: state})[0]
        bank = mixture.bank.tensor()[:, 0]  # (e c h p d), layer 0
        chosen = bank[routing.indices]  # (b k c h p d)
        w = routing.weights.gather(1, routing.indices)  # (b k)
        keys = torch.cat([chosen[:, 0, 0], chosen[:, 1, 0], k], 2)
        values = torch.cat([chosen[:, 0, 1], chosen[:, 1, 1], v], 2)
        b, t = ids.shape
        bias = torch.cat([w[:, :1].log().expand(b, 2), w[:, 1:].log().expand(b, 2), torch.zeros(b, t)], 1)
        key_mask = torch.cat([torch.ones(b, 4, dtype=torch.bool), mask.bool()], 1)
        expected = _manual_attention(q, keys, values, bias[:, None, None, :], key_mask, attn.scaling)
    expected = rearrange(expected, "b h t d -> b t (h d)")
    assert routing.indices[:, 0].ne(routing.indices[:, 1]).all()
    assert (out - expected).abs().max().item() <= 1e-5


def test_eager_backbone_stays_eager_and_matches_sdpa():
    ids, mask = batch(pad_side="left")
    outs = []
    for impl in ("sdpa", "eager"):
        model = tiny_llama()
        model.set_attn_implementation(impl)
        mixture = attach(model, PrefixConfig(num_experts=2, prefix_len=3, top_k=2, combine="concat")).eval()
        assert mixture.backbone.config._attn_implementation.endswith(impl)
        with torch.no_grad():
            outs.append(mixture(input_ids=ids, attention_mask=mask).logits)
    assert (outs[0] - outs[1])[mask.bool()].abs().max().item() <= 1e-5


def test_state_is_batch_expanded_for_beams():
    """A prefix state of batch b serves a query batch of b * beams (beam search repeats examples)."""
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=2, prefix_len=3, top_k=1, init_std=1.0)).eval()
    ids, mask = batch(b=2, pad_side="left")
    with torch.no_grad():
        g = torch.Generator().manual_seed(4)
        mixture.router.proj.weight.copy_(torch.randn(mixture.router.proj.weight.shape, generator=g) * 3.0)
        routing, state = mixture.prepare(ids, mask)
        single = mixture.backbone(input_ids=ids, attention_mask=mask, **{STATE_KWARG: state}).logits
        doubled = mixture.backbone(
            input_ids=ids.repeat_interleave(2, 0),
            attention_mask=mask.repeat_interleave(2, 0),
            **{STATE_KWARG: state},
        ).logits
    # Two examples on two different banks: a state repeated in the wrong order would swap their prefixes.
    assert routing.indices[:, 0].tolist() == [1, 0]
    # Top-1 blend: each example's prefix is its routed bank itself (weight 1), kept for all (b l c h p d).
    assert state.kv.shape == (2, 2, 2, 2, 3, 8)  # 2 key/value heads of dim 8 (grouped-query attention)
    assert torch.equal(state.kv, mixture.bank.tensor().detach()[routing.indices[:, 0]])
    assert state.bias is None
    assert torch.allclose(doubled[::2], single, atol=1e-6) and torch.allclose(doubled[1::2], single, atol=1e-6)


def test_decoupled_prefix_matches_its_formula_on_one_layer():
    """Prefix-Tuning+ style: attn(inputs) + sum_e w_e * gate_h * softmax(q K_e^T / sqrt(d)) V_e."""
    torch.manual_seed(0)
    model = tiny_bert()
    cfg = PrefixConfig(num_experts=3, prefix_len=2, top_k=2, prefix_mode="decoupled", init_std=1.0)
    mixture = attach(model, cfg).eval()
    torch.nn.init.normal_(mixture.router.proj.weight, std=1.0)
    with torch.no_grad():
        mixture.gate.normal_()
    ids, mask = batch(pad_side="right")
    attn, hidden, q, k, v = _bert_layer0_inputs(model, ids, mask)
    with torch.no_grad():
        routing, state = mixture.prepare(ids, mask)
        mask4d = mask.bool()[:, None, None, :].expand(-1, 1, ids.shape[1], -1)
        out = attn(hidden, attention_mask=mask4d, **{STATE_KWARG: state})[0]
        base = _manual_attention(q, k, v, torch.zeros(()), mask.bool(), attn.scaling)
        bank = mixture.bank.tensor()[:, 0].double()  # (e c h p d), layer 0
        extra = torch.zeros_like(base)
        for e in range(3):
            scores = torch.einsum("bhqd,hpd->bhqp", q.double(), bank[e, 0]) * attn.scaling
            term = torch.einsum("bhqp,hpd->bhqd", scores.softmax(-1), bank[e, 1])
            w = routing.weights[:, e].double()[:, None, None, None]
            extra += w * mixture.gate[0].double()[None, :, None, None] * term
        expected = rearrange(base + extra, "b h t d -> b t (h d)")
    assert (routing.weights > 0).sum(-1).eq(2).all()  # sparse: unchosen experts contribute nothing
    assert (out - expected).abs().max().item() <= 1e-5


# -- Gemma 3: sliding-window and global layers -----------------------------------------------------------


def tiny_gemma3(sliding_window: int = 3):
    """Gemma 3 with both layer kinds: sliding-window layers 0 and 2 (window 3 tokens), global layers 1 and 3."""
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    torch.manual_seed(0)
    config = Gemma3TextConfig(
        vocab_size=97,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        query_pre_attn_scalar=8,
        sliding_window=sliding_window,
        layer_types=["sliding_attention", "full_attention", "sliding_attention", "full_attention"],
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
    )
    return Gemma3ForCausalLM(config).eval()


def _hand_written_attention(prefix_kv, pad_mask, seen_layers):
    """An attention function that ignores the mask transformers built: it derives its own from the padding and
    the layer's kind (a key is visible when real, not in the future and, on sliding layers, fewer than `window`
    tokens back) and prepends the layer's prefix keys/values, visible to every query, in float64."""

    def attention(module, query, key, value, attention_mask, scaling=None, sliding_window=None, **kwargs):
        b, _, q, _ = query.shape
        t = key.shape[2]
        real = pad_mask.bool()[:, None, :]  # (b 1 t)
        i, j = torch.arange(q)[:, None], torch.arange(t)[None, :]
        visible = (j <= i)[None] & real
        if sliding_window is not None:
            visible = visible & (i - j < sliding_window)[None]
        seen_layers[module.layer_idx] = sliding_window
        groups = query.shape[1] // key.shape[1]
        if prefix_kv is not None:
            pk, pv = prefix_kv[:, module.layer_idx, 0], prefix_kv[:, module.layer_idx, 1]  # (b h p d)
            key, value = torch.cat([pk, key], 2), torch.cat([pv, value], 2)
            visible = torch.cat([visible.new_ones(b, q, pk.shape[2]), visible], -1)
        key, value = key.repeat_interleave(groups, 1), value.repeat_interleave(groups, 1)
        scores = torch.einsum("bhqd,bhtd->bhqt", query.double(), key.double()) * scaling
        scores = scores.masked_fill(~visible[:, None], -math.inf)
        probs = scores.softmax(-1).nan_to_num()  # a padding query row sees nothing: zeros
        out = torch.einsum("bhqt,bhtd->bqhd", probs, value.double())
        return out.to(query.dtype), None

    return attention


def _gemma3_logits_by_hand(model, ids, mask, prefix_kv):
    """The model's logits with the hand-written attention on every layer; also which window each layer used."""
    from transformers import AttentionInterface

    seen: dict[int, int | None] = {}
    AttentionInterface.register("hand_written_test", _hand_written_attention(prefix_kv, mask, seen))
    previous = model.config._attn_implementation
    model.set_attn_implementation("hand_written_test")
    try:
        positions = (mask.cumsum(-1) - 1).clamp_min(0)
        with torch.no_grad():
            logits = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    finally:
        model.set_attn_implementation(previous)
    return logits, seen


def test_gemma3_hand_written_attention_reproduces_the_bare_model():
    """The reference itself: without a prefix it equals transformers' own Gemma 3 (sliding windows included)."""
    ids, mask = batch(t=9, pad_side="left")
    model = tiny_gemma3()
    positions = (mask.cumsum(-1) - 1).clamp_min(0)
    with torch.no_grad():
        expected = model(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    got, seen = _gemma3_logits_by_hand(model, ids, mask, None)
    assert seen == {0: 3, 1: None, 2: 3, 3: None}  # both layer kinds ran
    assert max_diff(got, expected, mask) <= 1e-5
    wide = tiny_gemma3(sliding_window=64)  # same weights, no window in reach: other logits, so the window bites
    with torch.no_grad():
        unwindowed = wide(input_ids=ids, attention_mask=mask, position_ids=positions).logits
    assert max_diff(unwindowed, expected, mask) > 1e-3


@pytest.mark.parametrize("path", ["joint", "split"])
def test_gemma3_prefix_is_visible_to_every_query_on_sliding_and_global_layers(path):
    """With left padding and 9 tokens against a window of 3, the prefix positions stay visible to every query on
    every layer: the injection equals the hand-written attention (prefix prepended, always visible)."""
    ids, mask = batch(t=9, pad_side="left")
    model = tiny_gemma3()
    cfg = PrefixConfig(num_experts=2, prefix_len=3, top_k=2, init_std=1.0, attention_path=path)
    mixture = attach(model, cfg).eval()
    with torch.no_grad():
        _, state = mixture.prepare(ids, mask)
        got = mixture.run_backbone(state, input_ids=ids, attention_mask=mask).logits
    expected, seen = _gemma3_logits_by_hand(model, ids, mask, state.kv)  # kv: (b l c h p d), the routed blend
    assert seen == {0: 3, 1: None, 2: 3, 3: None}
    assert max_diff(got, expected, mask) <= 1e-5
    # the prefix matters on this model: without it the logits differ
    with torch.no_grad():
        bare = model(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0)).logits
    assert max_diff(bare, expected, mask) > 1e-3


def test_encoder_decoder_prefixes_are_refused_below_the_tested_transformers(monkeypatch):
    """The one version branch for encoder-decoder backbones: the releases their tests pass on, and a clear
    error below them (the lowest-versions CI stage runs the other side)."""
    import transformers
    from transformers import BartConfig, BartForConditionalGeneration

    from moe_prefix import PrefixConfig, attach
    from moe_prefix import injection as inj

    assert not inj.seq2seq_supported("5.6.0") and inj.seq2seq_supported("5.24.0") and inj.seq2seq_supported("6.0")
    config = BartConfig(
        vocab_size=50,
        d_model=16,
        encoder_layers=1,
        decoder_layers=1,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=32,
    )
    monkeypatch.setattr(transformers, "__version__", "5.6.0")
    with pytest.raises(ValueError, match=r"encoder-decoder backbones need transformers >= 5\.24"):
        attach(BartForConditionalGeneration(config), PrefixConfig(num_experts=2, prefix_len=2, top_k=1))
