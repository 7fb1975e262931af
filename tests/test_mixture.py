"""The mixture as a whole: lengths, padding and routing invariance, training, generation, checkpointing."""

import pytest
import torch
from conftest import FAMILIES, batch, tiny_bert, tiny_llama

from moe_prefix import PrefixConfig, attach
from moe_prefix.injection import STATE_KWARG, PrefixState, enable_activation_checkpointing


def _spread_router(mixture, std=3.0, seed=0):
    """Large router weights so that examples of a small batch pick different banks."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        mixture.router.proj.weight.copy_(torch.randn(mixture.router.proj.weight.shape, generator=g) * std)


def test_dynamic_length_equals_static_prefix_truncated():
    torch.manual_seed(0)
    ids, mask = batch(pad_side="right")
    cfg = PrefixConfig(num_experts=2, prefix_len=6, top_k=1, length="learned", init_std=1.0, router_init="random")
    mixture = attach(tiny_bert(), cfg).eval()
    with torch.no_grad():
        mixture.length.head[1].weight.normal_(std=2.0)  # lengths differ between examples
        routing, state = mixture.prepare(ids, mask)
        out = mixture(input_ids=ids, attention_mask=mask).logits
    lengths = routing.lengths.long()
    assert len(set(lengths.tolist())) > 1, lengths
    # At evaluation attention receives only the batch's longest prefix.
    assert state.kv.shape[-2] == lengths.max().item()
    static = attach(tiny_bert(), PrefixConfig(num_experts=2, prefix_len=6, top_k=1, router_init="random"))
    static.bank.set_from_activations(mixture.bank.tensor())
    static.router.load_state_dict(mixture.router.state_dict())
    static.eval()
    for i, n in enumerate(lengths.tolist()):
        with torch.no_grad():
            _, st = static.prepare(ids[i : i + 1], mask[i : i + 1])
            st.kv = st.kv[..., :n, :]
            expected = static.backbone(input_ids=ids[i : i + 1], attention_mask=mask[i : i + 1], **{STATE_KWARG: st})
        assert (out[i] - expected.logits[0]).abs().max().item() <= 1e-5


def test_soft_length_mask_is_differentiable_in_training():
    cfg = PrefixConfig(num_experts=2, prefix_len=6, top_k=1, length="learned")
    mixture = attach(tiny_bert(), cfg).train()
    ids, mask = batch()
    out = mixture(input_ids=ids, attention_mask=mask, labels=torch.tensor([0, 1, 0]))
    (out.loss + out.routing.aux_loss).backward()
    assert mixture.length.head[1].weight.grad.abs().sum() > 0


@pytest.mark.parametrize("combine", ["blend", "concat"])
@pytest.mark.parametrize("name,pad_side", [("bert", "right"), ("gpt2", "left"), ("llama", "left"), ("llama", "right")])
def test_batch_equals_each_example_alone(name, pad_side, combine):
    ids, mask = batch(b=4, pad_side=pad_side)
    cfg = PrefixConfig(num_experts=4, prefix_len=3, top_k=2, combine=combine, init_std=0.5)
    mixture = attach(FAMILIES[name](), cfg).eval()
    _spread_router(mixture)
    with torch.no_grad():
        out = mixture(input_ids=ids, attention_mask=mask)
    assert len({tuple(r) for r in out.routing.indices.tolist()}) > 1, "examples should pick different experts"
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        with torch.no_grad():
            alone = mixture(input_ids=ids[i : i + 1, real], attention_mask=mask[i : i + 1, real]).logits[0]
        got = out.logits[i, real] if out.logits.dim() == 3 else out.logits[i]
        assert (got - alone).abs().max().item() <= 1e-5


def test_gradients_reach_prefix_side_only_and_backbone_is_unchanged():
    cfg = PrefixConfig(num_experts=3, prefix_len=4, top_k=2, length="learned")
    mixture = attach(tiny_bert(), cfg)
    before = {k: v.clone() for k, v in mixture.backbone.state_dict().items()}
    ids, mask = batch()
    labels = torch.tensor([0, 1, 1])
    mixture.train()
    out = mixture(input_ids=ids, attention_mask=mask, labels=labels)
    (out.loss + out.routing.aux_loss).backward()
    assert mixture.bank.kv.grad.abs().sum() > 0
    assert mixture.router.proj.weight.grad.abs().sum() > 0
    assert mixture.length.head[1].weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in mixture.backbone.parameters())
    trainable = [p for p in mixture.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(trainable, lr=1e-2, weight_decay=0.1)
    for _ in range(20):
        opt.zero_grad()
        out = mixture(input_ids=ids, attention_mask=mask, labels=labels)
        (out.loss + out.routing.aux_loss).backward()
        opt.step()
    after = mixture.backbone.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_trainable_state_dict_holds_no_backbone_tensor():
    mixture = attach(tiny_bert(), PrefixConfig(train_modules=("classifier",)))
    keys = set(mixture.trainable_state_dict())
    assert keys == {
        "bank.kv",
        "router.proj.weight",
        "router.proj.bias",  # the k-means router (the default) has one
        "backbone.classifier.weight",
        "backbone.classifier.bias",
    }


def test_generate_with_routed_prefix_equals_stepwise_greedy_without_cache():
    ids, mask = batch(b=3, t=6, pad_side="left")
    cfg = PrefixConfig(num_experts=3, prefix_len=4, top_k=2, init_std=0.5)
    mixture = attach(tiny_llama(), cfg).eval()
    _spread_router(mixture)
    new = 5
    generated = mixture.generate(ids, attention_mask=mask, max_new_tokens=new, do_sample=False, eos_token_id=None)
    for i in range(ids.shape[0]):
        real = mask[i].bool()
        seq = ids[i : i + 1, real]
        with torch.no_grad():
            _, state = mixture.prepare(seq, torch.ones_like(seq))
            for _ in range(new):
                logits = mixture.backbone(input_ids=seq, use_cache=False, **{STATE_KWARG: state}).logits
                seq = torch.cat([seq, logits[:, -1].argmax(-1, keepdim=True)], 1)
        assert torch.equal(generated[i, -new:], seq[0, -new:])


def _beam_search(mixture, prompt, beams, new):
    """Beam search by hand, no cache, each hypothesis a batch of one under the prompt's routed prefix."""
    with torch.no_grad():
        _, state = mixture.prepare(prompt, torch.ones_like(prompt))
        hypotheses = [(prompt, 0.0)]
        for _ in range(new):
            candidates = []
            for seq, score in hypotheses:
                logits = mixture.backbone(input_ids=seq, use_cache=False, **{STATE_KWARG: state}).logits[0, -1]
                top = logits.log_softmax(-1).topk(beams)
                for lp, token in zip(top.values.tolist(), top.indices.tolist(), strict=True):
                    candidates.append((torch.cat([seq, torch.tensor([[token]])], 1), score + lp))
            hypotheses = sorted(candidates, key=lambda c: c[1], reverse=True)[:beams]
    return hypotheses


def test_generate_with_beams_equals_hand_written_beam_search():
    ids, mask = batch(b=2, t=5, pad_side="left")
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=2, prefix_len=3, top_k=1, init_std=0.5)).eval()
    _spread_router(mixture)
    beams, new = 3, 3
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
    # Each example's beams must read its own prefix: the examples route to different banks.
    assert mixture.last_routing.indices[0, 0] != mixture.last_routing.indices[1, 0]
    for i in range(ids.shape[0]):
        reference = _beam_search(mixture, ids[i : i + 1, mask[i].bool()], beams, new)
        rows = slice(i * beams, (i + 1) * beams)
        assert out.sequences[rows, -new:].tolist() == [seq[0, -new:].tolist() for seq, _ in reference]
        scores = torch.tensor([score for _, score in reference])
        assert (out.sequences_scores[rows] - scores).abs().max() <= 1e-4


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_gradient_checkpointing_gives_same_loss_and_gradients(name):
    ids, mask = batch(pad_side="right")
    labels = torch.tensor([0, 1, 1]) if name == "bert" else ids.masked_fill(mask == 0, -100)
    results = []
    for checkpointing in (False, True):
        cfg = PrefixConfig(num_experts=3, prefix_len=4, top_k=2, combine="concat", router_noise=0.0)
        mixture = attach(FAMILIES[name](), cfg)
        if checkpointing:
            enable_activation_checkpointing(mixture.backbone)
        mixture.train()
        out = mixture(input_ids=ids, attention_mask=mask, labels=labels)
        (out.loss + out.routing.aux_loss).backward()
        results.append((out.loss.detach(), mixture.bank.kv.grad.clone(), mixture.router.proj.weight.grad.clone()))
    (l0, b0, r0), (l1, b1, r1) = results
    assert abs(l0 - l1) <= 1e-5
    assert (b0 - b1).abs().max() <= 1e-5 and (r0 - r1).abs().max() <= 1e-5


def test_reparameterised_bank_folds_to_equal_outputs():
    cfg = PrefixConfig(num_experts=2, prefix_len=4, top_k=2, reparam=True, reparam_dim=8, reparam_hidden=16)
    mixture = attach(tiny_llama(), cfg).eval()
    ids, mask = batch(pad_side="left")
    with torch.no_grad():
        before = mixture(input_ids=ids, attention_mask=mask).logits
        mixture.fold()
        after = mixture(input_ids=ids, attention_mask=mask).logits
    assert mixture.bank.folded and not hasattr(mixture.bank, "mlp")
    assert (before - after)[mask.bool()].abs().max() <= 1e-6


def test_init_from_text_uses_real_token_keys():
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=2, prefix_len=3, init="tokens"))
    ids, mask = batch(b=4, t=8, pad_side="left")
    mixture.init_from_text(ids, mask)
    bank = mixture.bank.tensor().detach()
    assert not torch.equal(bank[0], bank[1])
    state = PrefixState(kv=None, capture={})
    with torch.no_grad():
        mixture.run_backbone(state, input_ids=ids, attention_mask=mask)
    keys = state.capture[1][0]  # layer 1 keys (b h t d)
    real_keys = keys.transpose(1, 2)[mask.bool()]  # (n h d)
    for e in range(2):
        for p in range(3):
            bank_key = bank[e, 1, 0, :, p]  # (h d)
            assert (real_keys - bank_key).abs().amax((1, 2)).min() <= 1e-6


def test_group_router_input_routes_by_group_and_ignores_the_text():
    cfg = PrefixConfig(num_experts=2, prefix_len=3, top_k=1, router_input="group", num_groups=3)
    mixture = attach(tiny_bert(), cfg).eval()
    ids, mask = batch()
    other_ids, _ = batch(seed=1)
    groups = torch.tensor([0, 2, 1])
    with torch.no_grad():
        logits = mixture(input_ids=ids, attention_mask=mask, group_ids=groups).routing.logits
        swapped = mixture(input_ids=ids, attention_mask=mask, group_ids=groups.flip(0)).routing.logits
        other_text = mixture(input_ids=other_ids, attention_mask=mask, group_ids=groups).routing.logits
    # A one-hot group feature without normalisation picks the group's column of the router matrix.
    assert torch.equal(logits, mixture.router.proj.weight.T[groups])
    assert torch.equal(swapped, logits.flip(0)) and not torch.equal(swapped, logits)
    assert torch.equal(other_text, logits)


@pytest.mark.parametrize("router_layer", [1, 2])
def test_hidden_router_input_is_the_masked_mean_after_router_layer(router_layer):
    cfg = PrefixConfig(
        num_experts=2, prefix_len=3, top_k=1, router_input="hidden", router_layer=router_layer, router_init="random"
    )
    mixture = attach(tiny_bert(), cfg).eval()
    ids, mask = batch()
    with torch.no_grad():
        routing = mixture(input_ids=ids, attention_mask=mask).routing
        hidden = tiny_bert()(input_ids=ids, attention_mask=mask, output_hidden_states=True).hidden_states
        w = mask[..., None].float()
        means = [(h * w).sum(1) / w.sum(1) for h in hidden]  # (b m) per depth: embeddings, layer 1, layer 2
        expected = mixture.router(means[router_layer]).logits
        elsewhere = [mixture.router(m).logits for i, m in enumerate(means) if i != router_layer]
    assert (routing.logits - expected).abs().max() <= 1e-5
    # The check can tell depths apart: features from any other depth give other logits.
    assert all((routing.logits - other).abs().max() > 1e-3 for other in elsewhere)


def test_decoupled_prefix_starts_as_the_backbone_and_trains():
    ids, mask = batch(pad_side="left")
    with torch.no_grad():
        expected = tiny_llama()(input_ids=ids, attention_mask=mask, position_ids=(mask.cumsum(-1) - 1).clamp_min(0))
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=2, prefix_len=3, top_k=1, prefix_mode="decoupled"))
    out = mixture(input_ids=ids, attention_mask=mask, labels=ids)
    assert (out.logits - expected.logits)[mask.bool()].abs().max() <= 1e-6
    out.loss.backward()
    assert mixture.gate.grad.abs().sum() > 0


@pytest.mark.parametrize("impl", ["sdpa", "eager"])
@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_detach_backbone_gives_back_the_untouched_model(name, impl):
    ids, mask = batch()
    untouched = FAMILIES[name]()
    untouched.set_attn_implementation(impl)
    with torch.no_grad():
        expected = untouched(input_ids=ids, attention_mask=mask).logits
    model = FAMILIES[name]()
    model.set_attn_implementation(impl)
    mixture = attach(model, PrefixConfig(num_experts=2, prefix_len=3, top_k=1, init_std=1.0)).eval()
    with torch.no_grad():
        prefixed = mixture(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(prefixed, expected)  # the prefix did reach attention before detaching
    backbone = mixture.detach_backbone()
    assert backbone is model and backbone.config._attn_implementation == impl
    with torch.no_grad():
        assert torch.equal(backbone(input_ids=ids, attention_mask=mask).logits, expected)
