"""Encoder-decoder backbones (BART, T5): prefixes on encoder self-attention, decoder self-attention and
cross-attention, checked against attention written by hand here, and generate() against decoding by hand."""

import math

import pytest
import torch
from transformers import (
    AttentionInterface,
    BartConfig,
    BartForConditionalGeneration,
    T5Config,
    T5ForConditionalGeneration,
)
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from moe_prefix import PrefixConfig, attach
from moe_prefix.injection import SEQ2SEQ_MIN_TRANSFORMERS, STATE_KWARG, seq2seq_supported

pytestmark = pytest.mark.skipif(
    not seq2seq_supported(), reason=f"encoder-decoder prefixes need transformers >= {SEQ2SEQ_MIN_TRANSFORMERS}"
)


VOCAB = 64
SITES = ("encoder", "decoder", "cross")


def tiny_bart(**overrides) -> BartForConditionalGeneration:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB,
        d_model=16,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=2,
        decoder_attention_heads=2,
        encoder_ffn_dim=32,
        decoder_ffn_dim=32,
        max_position_embeddings=64,
        pad_token_id=1,
        bos_token_id=0,
        eos_token_id=2,
        decoder_start_token_id=2,
        forced_eos_token_id=None,
        dropout=0.0,
        attention_dropout=0.0,
        activation_dropout=0.0,
        init_std=0.2,  # logits of order one, so the prefix visibly moves them
    )
    return BartForConditionalGeneration(BartConfig(**(fields | overrides))).eval()


def tiny_t5(**overrides) -> T5ForConditionalGeneration:
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB,
        d_model=16,
        d_kv=8,
        d_ff=32,
        num_layers=2,
        num_heads=2,
        relative_attention_num_buckets=8,
        dropout_rate=0.0,
        pad_token_id=0,
        eos_token_id=1,
        decoder_start_token_id=0,
    )
    model = T5ForConditionalGeneration(T5Config(**(fields | overrides))).eval()
    with torch.no_grad():  # a visible relative position bias, so a wrong bias over the prefix shows
        for name, param in model.named_parameters():
            if "relative_attention_bias" in name:
                param.normal_(std=2.0)
    return model


BUILDERS = {"bart": tiny_bart, "t5": tiny_t5}


def site_of(name: str) -> tuple[str, int] | None:
    """(site, layer) of an attention module from its name in BART or T5, written here independently of the
    package: BART's encoder.layers.i.self_attn / decoder.layers.i.{self_attn, encoder_attn}, T5's
    encoder.block.i.layer.0.SelfAttention / decoder.block.i.layer.{0.SelfAttention, 1.EncDecAttention}."""
    parts = name.split(".")
    stack = "encoder" if "encoder" in parts[:-1] and "decoder" not in parts else "decoder"
    if parts[-1] in ("self_attn", "SelfAttention"):
        return (stack, int(parts[parts.index("layers" if "layers" in parts else "block") + 1]))
    if parts[-1] in ("encoder_attn", "EncDecAttention"):
        return ("cross", int(parts[parts.index("layers" if "layers" in parts else "block") + 1]))
    return None


# -- attention by hand ------------------------------------------------------------------------------------
REFERENCE = "moe_prefix_test_reference"
_prefixes: dict[int, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}  # id(module) -> keys, values, bias


def _reference_attention(module, query, key, value, mask, scaling=None, position_bias=None, **kwargs):
    """softmax([q k_p^T * s + bias_p, q k^T * s + position_bias + mask]) [v_p; v] in float64.

    The prefix columns get the prefix bias (log weights, log length mask) and no position bias; the real
    columns get exactly what the frozen model gives them.
    """
    q, k, v = query.double(), key.double(), value.double()
    scale = q.shape[-1] ** -0.5 if scaling is None else scaling
    scores = torch.einsum("bhqd,bhtd->bhqt", q, k) * scale
    if position_bias is not None:
        scores = scores + position_bias.double()
    n_q, n_t = q.shape[2], k.shape[2]
    if mask is None and module.is_causal and n_q > 1:
        mask = torch.ones(n_q, n_t, dtype=torch.bool).tril(n_t - n_q)[None, None]
    if mask is not None:
        scores = scores.masked_fill(~mask, -math.inf) if mask.dtype == torch.bool else scores + mask.double()
    prefix = _prefixes.get(id(module))
    if prefix is not None:
        pk, pv, bias = (x.double() for x in prefix)  # (b h p d), (b h p d), (b p)
        if pk.shape[0] != q.shape[0]:  # beams: each example's prefix repeated
            pk, pv, bias = (x.repeat_interleave(q.shape[0] // x.shape[0], 0) for x in (pk, pv, bias))
        prefix_scores = torch.einsum("bhqd,bhpd->bhqp", q, pk) * scale + bias[:, None, None, :]
        scores = torch.cat([prefix_scores, scores], -1)
        v = torch.cat([pv, v], 2)
    out = torch.einsum("bhqt,bhtd->bhqd", scores.softmax(-1), v)
    return out.transpose(1, 2).to(query.dtype).contiguous(), None


AttentionInterface.register(REFERENCE, _reference_attention)
AttentionMaskInterface.register(REFERENCE, sdpa_mask)


def reference_prefixes(mixture, routing) -> tuple[torch.Tensor, torch.Tensor]:
    """Each example's prefix (b r c h p d) and bias (b p), built by hand from the bank and the routing."""
    cfg = mixture.cfg
    bank = mixture.bank.tensor().detach()  # (e r c h p d)
    P = cfg.prefix_len
    i = torch.arange(P, dtype=torch.float32)
    lengths = routing.lengths[:, None]  # (b 1)
    if mixture.training:
        length_bias = torch.log(torch.sigmoid((lengths - i - 0.5) / cfg.length_tau).clamp_min(1e-12))
    else:
        length_bias = torch.zeros(len(lengths), P).masked_fill(i >= lengths.round(), -math.inf)
    if cfg.combine == "blend":
        kv = torch.einsum("be,erchpd->brchpd", routing.weights, bank)
        return kv, length_bias
    chosen = bank[routing.indices]  # (b k r c h p d)
    kv = torch.cat(chosen.unbind(1), dim=-2)  # banks side by side on the position axis
    weights = routing.weights.gather(1, routing.indices)  # (b k)
    bias = torch.cat([weights[:, j : j + 1].log() + length_bias for j in range(weights.shape[1])], -1)
    return kv, bias


def reference_model(name: str, mixture, routing):
    """A fresh copy of the frozen backbone whose attention is `_reference_attention`, prefixed on the sites."""
    model = BUILDERS[name]()
    model.set_attn_implementation(REFERENCE)
    kv, bias = reference_prefixes(mixture, routing)
    rows = [(site, layer) for site in mixture.cfg.sites for layer in range(2)]  # the documented row order
    _prefixes.clear()
    for module_name, module in model.named_modules():
        where = site_of(module_name)
        if where is not None and where in rows:
            r = rows.index(where)
            _prefixes[id(module)] = (kv[:, r, 0], kv[:, r, 1], bias)
    return model


def batch(pad_side: str, b: int = 3, t: int = 7, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for row, n in enumerate([0, 2, 4][:b] if pad_side != "none" else []):  # rows padded by 0, 2, 4 tokens
        if n:
            mask[row, -n:] = 0 if pad_side == "right" else 1
            if pad_side == "left":
                mask[row, :n] = 0
                mask[row, n:] = 1
    decoder_ids = torch.randint(3, VOCAB, (b, 5), generator=g)
    return ids, mask, decoder_ids


def spread(mixture, std: float = 1.0, ids=None, mask=None):
    """Make routing, lengths (centred on this batch) and prefixes visibly different across examples."""
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        mixture.router.proj.weight.copy_(torch.randn(mixture.router.proj.weight.shape, generator=g) * 3.0)
        if mixture.bank.kv is not None:
            mixture.bank.kv.copy_(torch.randn(mixture.bank.kv.shape, generator=g) * std)
        if mixture.cfg.length == "learned":
            head = mixture.length.head[1]
            head.weight.copy_(torch.randn(head.weight.shape, generator=g) * 3.0)
            z = mixture.length.head(mixture.router_features(ids, mask)).squeeze(-1)
            head.bias.sub_(z.mean())


def _forward(mixture, ids, mask, decoder_ids):
    return mixture(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits


# -- tests ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_rows_are_one_per_site_and_layer_in_the_documented_order(name):
    mixture = attach(BUILDERS[name](), PrefixConfig(num_experts=2, prefix_len=3))
    assert mixture.rows == [(site, layer) for site in SITES for layer in range(2)]
    assert mixture.bank.kv.shape == (2, 6, 2, 2, 3, 8)  # e, rows (3 sites x 2 layers), c, h, p, d
    only = attach(BUILDERS[name](), PrefixConfig(num_experts=2, prefix_len=3, sites=["cross", "encoder"]))
    assert only.rows == [("encoder", 0), ("encoder", 1), ("cross", 0), ("cross", 1)]


def test_sites_are_validated():
    with pytest.raises(ValueError, match="prefix.sites"):
        PrefixConfig(sites=("encoder", "decoders"))
    with pytest.raises(ValueError, match="prefix.sites"):
        PrefixConfig(sites=())
    from moe_prefix.train.run_config import ConfigError, load_config

    assert load_config(None, ["prefix.sites=[cross,decoder]"]).prefix.sites == ("decoder", "cross")
    with pytest.raises(ConfigError, match=r"prefix.sites=\['decoders'\]"):
        load_config(None, ["prefix.sites=[decoders]"])


CASES = [
    # (combine, length, sites, training)
    ("blend", "fixed", SITES, False),
    ("concat", "fixed", SITES, False),
    ("blend", "learned", SITES, False),
    ("concat", "learned", SITES, False),
    ("blend", "learned", SITES, True),
    ("blend", "fixed", ("encoder",), False),
    ("blend", "fixed", ("decoder",), False),
    ("concat", "fixed", ("cross",), False),
]


@pytest.mark.parametrize("pad_side", ["left", "right", "none"])
@pytest.mark.parametrize("combine,length,sites,training", CASES)
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_mixture_matches_hand_written_attention(name, combine, length, sites, training, pad_side):
    cfg = PrefixConfig(
        num_experts=3, prefix_len=4, top_k=2, combine=combine, length=length, sites=sites, router_noise=0.0
    )
    mixture = attach(BUILDERS[name](), cfg).train(training)
    ids, mask, decoder_ids = batch(pad_side)
    spread(mixture, ids=ids, mask=mask)
    with torch.no_grad():
        got = _forward(mixture, ids, mask, decoder_ids)
        routing = mixture.last_routing
        expected = reference_model(name, mixture, routing)(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids
        ).logits
        bare = BUILDERS[name]()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    if length == "learned":
        assert routing.lengths.round().unique().numel() > 1  # the examples' prefixes really differ in length
    assert (got - bare).abs().max().item() > 1e-2  # the prefix changes the output
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_eager_backbone_matches_hand_written_attention(name):
    """The eager path adds T5's position bias as T5's own eager attention does."""
    model = BUILDERS[name]()
    model.set_attn_implementation("eager")
    mixture = attach(model, PrefixConfig(num_experts=2, prefix_len=3, top_k=1)).eval()
    spread(mixture)
    ids, mask, decoder_ids = batch("right")
    with torch.no_grad():
        got = _forward(mixture, ids, mask, decoder_ids)
        expected = reference_model(name, mixture, mixture.last_routing)(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids
        ).logits
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_router_reads_the_encoder_input_only(name):
    """One routing decision per input serves every site: it does not move with the decoder input."""
    mixture = attach(BUILDERS[name](), PrefixConfig(num_experts=3, prefix_len=2, router_input="hidden", router_layer=1))
    mixture.eval()
    spread(mixture)
    ids, mask, decoder_ids = batch("right")
    with torch.no_grad():
        _forward(mixture, ids, mask, decoder_ids)
        first = mixture.last_routing.logits
        _forward(mixture, ids, mask, decoder_ids.flip(0))
        assert torch.equal(mixture.last_routing.logits, first)
        encoder = mixture.backbone.get_encoder()
        hidden = encoder(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states[1]
    features = (hidden * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(mixture.router_features(ids, mask), features, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_detached_backbone_computes_what_it_did_before(name):
    ids, mask, decoder_ids = batch("left")
    with torch.no_grad():
        before = BUILDERS[name]()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        mixture = attach(BUILDERS[name](), PrefixConfig(num_experts=2, prefix_len=3))
        backbone = mixture.detach_backbone()
        after = backbone(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert torch.equal(before, after)


@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_split_path_on_bart_matches_hand_written_attention_and_the_joint_gradients(pad_side):
    """BART's three sites on the split path (fused token kernel + prefix part): outputs and bank gradients."""
    ids, mask, decoder_ids = batch(pad_side)
    grads, outs = [], []
    for path in ("split", "joint"):
        cfg = PrefixConfig(num_experts=3, prefix_len=4, top_k=2, combine="concat", attention_path=path)
        mixture = attach(tiny_bart(), cfg).eval()
        spread(mixture)
        out = _forward(mixture, ids, mask, decoder_ids)
        out.square().sum().backward()
        outs.append(out.detach())
        grads.append(mixture.bank.kv.grad)
    with torch.no_grad():
        expected = reference_model("bart", mixture, mixture.last_routing)(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids
        ).logits
    assert (outs[0] - expected).abs().max().item() <= 1e-5
    assert grads[0].abs().max() > 0 and torch.allclose(grads[0], grads[1], atol=1e-5)


# -- generate ---------------------------------------------------------------------------------------------
def _generating_mixture(name, **overrides):
    cfg = PrefixConfig(**{"num_experts": 3, "prefix_len": 3, "top_k": 1, **overrides})
    mixture = attach(BUILDERS[name](), cfg).eval()
    spread(mixture)
    return mixture


def _next_log_probs(mixture, ids, mask, state, decoder_ids):
    """Log-probabilities of the next decoder token, a full forward without any cache."""
    logits = mixture.backbone(
        input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids, use_cache=False, **{STATE_KWARG: state}
    ).logits
    return logits[0, -1].log_softmax(-1)


@pytest.mark.parametrize("pad_side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_generate_equals_stepwise_greedy_and_runs_the_encoder_once(name, pad_side):
    mixture = _generating_mixture(name)
    ids, mask, _ = batch(pad_side)
    encoder_calls = []
    hook = mixture.backbone.get_encoder().register_forward_pre_hook(lambda *_: encoder_calls.append(1))
    new = 5
    try:
        generated = mixture.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
    finally:
        hook.remove()
    assert len(encoder_calls) == 1
    assert mixture.last_routing.indices[:, 0].unique().numel() > 1  # examples read different prefixes
    start = mixture.backbone.config.decoder_start_token_id
    for i in range(ids.shape[0]):
        row, row_mask = ids[i : i + 1], mask[i : i + 1]
        with torch.no_grad():
            _, state = mixture.prepare(row, row_mask)
            seq = torch.tensor([[start]])
            for _ in range(new):
                token = _next_log_probs(mixture, row, row_mask, state, seq).argmax()
                seq = torch.cat([seq, token.view(1, 1)], 1)
        assert generated[i].tolist() == seq[0].tolist()


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_right_padded_example_decodes_as_it_does_alone(name):
    mixture = _generating_mixture(name, combine="concat", top_k=2)
    ids, mask, _ = batch("right")
    together = mixture.generate(ids, attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None)
    for i in range(ids.shape[0]):
        alone = ids[i : i + 1, mask[i].bool()]
        got = mixture.generate(
            alone, attention_mask=torch.ones_like(alone), max_new_tokens=4, do_sample=False, eos_token_id=None
        )
        assert got[0].tolist() == together[i].tolist()


def _beam_search(mixture, ids, mask, beams, new):
    """Beam search by hand, no cache, each hypothesis a batch of one under the input's routed prefix."""
    start = mixture.backbone.config.decoder_start_token_id
    with torch.no_grad():
        _, state = mixture.prepare(ids, mask)
        hypotheses = [(torch.tensor([[start]]), 0.0)]
        for _ in range(new):
            candidates = []
            for seq, score in hypotheses:
                top = _next_log_probs(mixture, ids, mask, state, seq).topk(beams)
                for lp, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    candidates.append((torch.cat([seq, torch.tensor([[token]])], 1), score + lp))
            hypotheses = sorted(candidates, key=lambda c: c[1], reverse=True)[:beams]
    return hypotheses


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_generate_with_beams_equals_hand_written_beam_search(name):
    mixture = _generating_mixture(name)
    ids, mask, _ = batch("right", b=2)
    beams, new = 3, 3
    encoder_calls = []
    hook = mixture.backbone.get_encoder().register_forward_pre_hook(lambda *_: encoder_calls.append(1))
    try:
        out = mixture.generate(
            ids,
            attention_mask=mask,
            max_new_tokens=new,
            num_beams=beams,
            num_return_sequences=beams,
            length_penalty=0.0,  # scores are plain sums of log-probabilities
            do_sample=False,
            eos_token_id=None,
            return_dict_in_generate=True,
            output_scores=True,
        )
    finally:
        hook.remove()
    assert len(encoder_calls) == 1
    assert mixture.last_routing.indices[0, 0] != mixture.last_routing.indices[1, 0]
    for i in range(ids.shape[0]):
        reference = _beam_search(mixture, ids[i : i + 1], mask[i : i + 1], beams, new)
        rows = slice(i * beams, (i + 1) * beams)
        assert out.sequences[rows].tolist() == [seq[0].tolist() for seq, _ in reference]
        scores = torch.tensor([score for _, score in reference])
        assert (out.sequences_scores[rows] - scores).abs().max() <= 1e-4


# -- PEFT (0.21.2 with transformers 5.x): its seq2seq prefix reaches decoder self-attention only --------------
def _peft_seq2seq(model, P, seed=1):
    """A PEFT seq2seq prefix-tuning model with a random prefix of P positions."""
    peft = pytest.importorskip("peft")
    peft_model = peft.get_peft_model(model, peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=P))
    peft_model.eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in peft_model.prompt_encoder.parameters():
            param.normal_()
    return peft_model


def without_decoder_positions(model):
    """Zero the decoder's position tables (BART's learned positions, T5's relative bias).

    PEFT's cache route shifts decoder positions by P (BART) and gives the prefix a relative bias (T5); the
    mixture keeps decoder positions and gives the prefix none. Without decoder positions the two agree, so
    what is compared is the attention over [prefix, tokens] itself.
    """
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("model.decoder.embed_positions", "decoder.block.0.layer.0.SelfAttention.relative")):
                param.zero_()
    return model


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_peft_seq2seq_prefix_reaches_decoder_self_attention_only_and_not_generate(name):
    """What PEFT does today, which the import and export below follow (a change in PEFT shows up here)."""
    P = 3
    keys: dict[str, list[int]] = {}

    def spy(module, query, key, value, mask, **kwargs):
        site = "encoder" if not module.is_decoder else ("decoder" if module.is_causal else "cross")
        keys.setdefault(site, []).append(key.shape[2])
        return _reference_attention(module, query, key, value, mask, **kwargs)

    AttentionInterface.register("moe_prefix_test_spy", spy)
    AttentionMaskInterface.register("moe_prefix_test_spy", sdpa_mask)
    model = BUILDERS[name]()
    model.set_attn_implementation("moe_prefix_test_spy")
    _prefixes.clear()
    peft_model = _peft_seq2seq(model, P)
    ids, mask, decoder_ids = batch("right")
    with torch.no_grad():
        peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    assert keys == {"encoder": [7, 7], "decoder": [5 + P, 5 + P], "cross": [7, 7]}
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, eos_token_id=None)
    with torch.no_grad():
        with_prefix = peft_model.generate(input_ids=ids, **kwargs)
        with peft_model.disable_adapter():
            without = peft_model.generate(input_ids=ids, **kwargs)
    assert torch.equal(with_prefix, without)  # generate() drops the prefix


@pytest.mark.parametrize("pad_side", ["left", "right"])
@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_imported_peft_seq2seq_adapter_gives_peft_logits(name, pad_side, tmp_path):
    from moe_prefix.peft_interop import attach_peft_adapters

    P = 4
    peft_model = _peft_seq2seq(without_decoder_positions(BUILDERS[name]()), P)
    peft_model.save_pretrained(tmp_path)
    ids, mask, decoder_ids = batch(pad_side)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    mixture = attach_peft_adapters(without_decoder_positions(BUILDERS[name]()), tmp_path).eval()
    assert mixture.cfg.sites == ("decoder",)
    with torch.no_grad():
        got = _forward(mixture, ids, mask, decoder_ids)
        bare = BUILDERS[name]()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    assert (expected - bare).abs().max().item() > 1e-2
    assert (got - expected).abs().max().item() <= 1e-5


def test_peft_seq2seq_pairs_follow_get_prompt():
    """PEFT's own get_prompt, on a prefix whose every pair is told apart, decides which pair each layer reads."""
    peft = pytest.importorskip("peft")
    from moe_prefix.peft_interop import seq2seq_pair

    for layers in (2, 3, 4):
        model = tiny_bart(encoder_layers=layers, decoder_layers=layers)
        peft_model = peft.get_peft_model(
            model, peft.PrefixTuningConfig(task_type="SEQ_2_SEQ_LM", num_virtual_tokens=1, inference_mode=True)
        )
        weight = peft_model.prompt_encoder["default"].embedding.weight  # (p (l c h d)), pair j filled with j
        with torch.no_grad():
            weight.copy_(torch.arange(layers).repeat_interleave(2 * 16).float()[None])
            cache = peft_model.get_prompt(batch_size=1)
        for layer in range(layers):
            assert cache.self_attention_cache.layers[layer].keys.unique().item() == seq2seq_pair(
                "decoder", layer, layers
            )
        # the cross-attention half of each chunk never reaches the cache PEFT builds (transformers 5.x), so
        # seq2seq_pair's cross mapping follows PEFT's get_prompt code and cannot be checked against PEFT here
        assert len(cache.cross_attention_cache.layers) == 0


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_exported_seq2seq_adapter_loads_in_peft_with_the_same_logits(name, tmp_path):
    peft = pytest.importorskip("peft")
    from moe_prefix.peft_interop import attach_peft_adapters, export_peft_adapter

    cfg = PrefixConfig(num_experts=2, prefix_len=3, top_k=1, sites=("decoder",))
    mixture = attach(without_decoder_positions(BUILDERS[name]()), cfg).eval()
    spread(mixture)
    with pytest.raises(ValueError, match="same prefix"):  # with 2 layers, PEFT's layer 0 and 1 share one
        export_peft_adapter(mixture, tmp_path / "refused", expert=1)
    with torch.no_grad():
        mixture.bank.kv[:, 1] = mixture.bank.kv[:, 0]
    with pytest.warns(UserWarning, match=r"pairs \[1\].*zeros"):
        export_peft_adapter(mixture, tmp_path, expert=1)
    peft_model = peft.PeftModel.from_pretrained(without_decoder_positions(BUILDERS[name]()), tmp_path).eval()
    assert peft_model.peft_config["default"].task_type == "SEQ_2_SEQ_LM"
    ids, mask, decoder_ids = batch("right")
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = _forward(mixture, ids, mask, decoder_ids)
    assert mixture.last_routing.indices[:, 0].eq(1).any() and mixture.last_routing.indices[:, 0].eq(0).any()
    rows = mixture.last_routing.indices[:, 0] == 1  # PEFT holds expert 1: compare the inputs routed to it
    assert (got[rows] - expected[rows]).abs().max().item() <= 1e-5
    # decoder and cross sites round-trip through PEFT's layout; cross prefixes that it makes one must agree
    both = attach_peft_adapters(BUILDERS[name](), tmp_path, sites=("decoder", "cross"))
    export_peft_adapter(both, tmp_path / "again")
    from safetensors.torch import load_file

    first, again = (
        load_file(str(tmp_path / "adapter_model.safetensors")),
        load_file(str(tmp_path / "again" / "adapter_model.safetensors")),
    )
    assert torch.equal(first["prompt_embeddings"], again["prompt_embeddings"])
    with torch.no_grad():
        both.bank.kv[:, 2] += 1.0  # cross layer 0 only
    with pytest.raises(ValueError, match="cross layer 1 the same prefix"):
        export_peft_adapter(both, tmp_path / "refused")
    with pytest.raises(ValueError, match="no encoder prefix"):
        export_peft_adapter(
            attach(BUILDERS[name](), PrefixConfig(num_experts=1, prefix_len=2, top_k=1)), tmp_path / "x"
        )


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_mixtures_with_other_sites_share_one_backbone(name):
    """The rows travel with each forward's prefix state, not on the modules: attaching again changes nothing."""
    backbone = BUILDERS[name]()
    first = attach(backbone, PrefixConfig(num_experts=2, prefix_len=3, top_k=1, sites=("decoder",))).eval()
    spread(first)
    attach(backbone, PrefixConfig(num_experts=2, prefix_len=3, top_k=1, sites=("encoder", "cross")))
    ids, mask, decoder_ids = batch("right")
    with torch.no_grad():
        got = _forward(first, ids, mask, decoder_ids)
        expected = reference_model(name, first, first.last_routing)(
            input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids
        ).logits
    assert (got - expected).abs().max().item() <= 1e-5


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_fold_keeps_the_outputs_of_a_reparameterised_bank(name):
    cfg = PrefixConfig(num_experts=2, prefix_len=3, top_k=1, reparam=True, reparam_hidden=16, init_std=1.0)
    mixture = attach(BUILDERS[name](), cfg).eval()
    ids, mask, decoder_ids = batch("right")
    with torch.no_grad():
        before = _forward(mixture, ids, mask, decoder_ids)
        mixture.fold()
        after = _forward(mixture, ids, mask, decoder_ids)
    assert mixture.bank.kv.shape[1] == 6 and torch.allclose(before, after, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_decoupled_prefix_starts_as_the_frozen_model_and_moves_with_its_gates(name):
    cfg = PrefixConfig(num_experts=2, prefix_len=3, top_k=1, prefix_mode="decoupled", init_std=1.0)
    mixture = attach(BUILDERS[name](), cfg).eval()
    ids, mask, decoder_ids = batch("right")
    with torch.no_grad():
        bare = BUILDERS[name]()(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        assert mixture.gate.shape == (6, 2)  # one gate per row (site, layer) and head
        assert (_forward(mixture, ids, mask, decoder_ids) - bare).abs().max().item() <= 1e-6
        mixture.gate.fill_(1.0)
        assert (_forward(mixture, ids, mask, decoder_ids) - bare).abs().max().item() > 1e-2


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_candidate_router_features_read_the_encoder_layers(name):
    mixture = attach(BUILDERS[name](), PrefixConfig(num_experts=2, prefix_len=3))
    ids, mask, _ = batch("right")
    features = mixture.candidate_router_features(ids, mask)
    assert list(features) == ["embeddings", "hidden1", "hidden2"]  # the encoder's 2 layers
    with torch.no_grad():
        hidden = mixture.backbone.get_encoder()(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    expected = (hidden.hidden_states[1] * mask[..., None]).sum(1) / mask.sum(1, keepdim=True)
    assert torch.allclose(features["hidden1"], expected, atol=1e-6)


@pytest.mark.parametrize("name", sorted(BUILDERS))
def test_shared_prefix_on_a_seq2seq_mixture_exports_to_peft(name, tmp_path):
    """prefix.shared_len on the decoder site: PEFT's logits from the exported [shared, routed] prefix."""
    peft = pytest.importorskip("peft")
    from moe_prefix.peft_interop import export_peft_adapter

    cfg = PrefixConfig(num_experts=1, prefix_len=2, top_k=1, shared_len=2, sites=("decoder",), init_std=1.0)
    mixture = attach(without_decoder_positions(BUILDERS[name]()), cfg).eval()
    with torch.no_grad():  # PEFT's layout makes the two decoder layers' prefixes one (see above)
        mixture.bank.kv[:, 1] = mixture.bank.kv[:, 0]
        mixture.shared.kv[:, 1] = mixture.shared.kv[:, 0]
    with pytest.warns(UserWarning, match="zeros"):
        export_peft_adapter(mixture, tmp_path)
    peft_model = peft.PeftModel.from_pretrained(without_decoder_positions(BUILDERS[name]()), tmp_path).eval()
    assert peft_model.peft_config["default"].num_virtual_tokens == 4
    ids, mask, decoder_ids = batch("right")
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
        got = _forward(mixture, ids, mask, decoder_ids)
    assert (got - expected).abs().max().item() <= 1e-5
