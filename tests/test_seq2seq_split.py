"""prefix.attention_path=split on T5: the relative position bias joins the token part's mask, the prefix part gets
none (as on the joint path); outputs and gradients equal to the joint path's and to attention written by hand."""

import pytest
import torch
from test_seq2seq import SITES, batch, reference_model, spread, tiny_t5

from moe_prefix import PrefixConfig, attach
from moe_prefix import injection as inj
from moe_prefix.injection import SEQ2SEQ_MIN_TRANSFORMERS, seq2seq_supported

pytestmark = pytest.mark.skipif(
    not seq2seq_supported(), reason=f"encoder-decoder prefixes need transformers >= {SEQ2SEQ_MIN_TRANSFORMERS}"
)

torch.set_num_threads(1)


def _mixture(path: str, ids=None, mask=None, **overrides):
    cfg = PrefixConfig(**{"num_experts": 3, "prefix_len": 4, "top_k": 2, "router_noise": 0.0, **overrides})
    mixture = attach(tiny_t5(), PrefixConfig(**{**cfg.__dict__, "attention_path": path}))
    spread(mixture, ids=ids, mask=mask)  # learned lengths centred on this batch
    return mixture


def _step(mixture, ids, mask, decoder_ids):
    """Forward and backward of a weighted sum of the logits: the logits and every trainable tensor's gradient."""
    logits = mixture(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits
    w = torch.randn(logits.shape, generator=torch.Generator().manual_seed(11)).to(logits)
    ((logits * w).sum() + mixture.last_routing.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in mixture.named_parameters() if p.grad is not None}
    return logits.detach(), grads


def _count_split_calls(monkeypatch) -> list:
    calls = []
    original = inj.split_attention
    monkeypatch.setattr(inj, "split_attention", lambda *a, **k: calls.append(a[6]) or original(*a, **k))
    return calls


CASES = [  # combine, length, training (learned lengths in training: a soft length mask, a bias with a gradient)
    ("blend", "fixed", False),
    ("concat", "fixed", False),
    ("concat", "learned", True),
]


@pytest.mark.parametrize("sites", [SITES, ("encoder",), ("decoder",), ("cross",)], ids="-".join)
@pytest.mark.parametrize("combine,length,training", CASES)
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_t5_split_path_matches_the_joint_path_and_hand_written_attention(
    pad_side, combine, length, training, sites, monkeypatch
):
    ids, mask, decoder_ids = batch(pad_side)
    calls = _count_split_calls(monkeypatch)
    results = {}
    for path in ("split", "joint"):
        mixture = _mixture(path, ids, mask, combine=combine, length=length, sites=sites, length_tau=2.0)
        mixture.train(training)
        results[path] = _step(mixture, ids, mask, decoder_ids)
        if path == "split":
            assert len(calls) == 2 * len(sites)  # every prefixed module took the split path, none fell back
            assert all(m is not None and m.shape[1] == 2 for m in calls)  # a per-head mask: the position bias
    (split, split_grads), (joint, joint_grads) = results["split"], results["joint"]
    assert (split - joint).abs().max().item() <= 1e-5
    assert split_grads.keys() == joint_grads.keys() and "bank.kv" in split_grads
    for name, grad in joint_grads.items():
        assert grad.abs().max() > 0, name
        assert (split_grads[name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name
    if not training:  # and the hand-written softmax over [prefix, tokens], zero bias on the prefix
        with torch.no_grad():
            expected = reference_model("t5", mixture, mixture.last_routing)(
                input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids
            ).logits
        assert (split - expected).abs().max().item() <= 1e-5


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("pad_side", ["left", "right"])
def test_t5_split_path_on_cuda_matches_the_joint_path(pad_side):
    """On CUDA a position bias sends the token part to the memory-efficient kernel (flash takes no mask)."""
    ids, mask, decoder_ids = (x.cuda() for x in batch(pad_side))
    results = {}
    for path in ("split", "joint"):
        mixture = _mixture(path, ids.cpu(), mask.cpu(), combine="concat", length="learned", length_tau=2.0)
        results[path] = _step(mixture.cuda().train(), ids, mask, decoder_ids)
    (split, split_grads), (joint, joint_grads) = results["split"], results["joint"]
    assert (split - joint).abs().max().item() <= 1e-4
    for name, grad in joint_grads.items():
        assert (split_grads[name] - grad).abs().max().item() <= 1e-4 * max(1.0, grad.abs().max().item()), name


def test_t5_split_generate_matches_the_joint_path(monkeypatch):
    """Decoding with a key cache: one query a step, T5's bias for the cached positions, cross-attention's cache."""
    ids, mask, _ = batch("right")
    calls = _count_split_calls(monkeypatch)
    outs = []
    for path in ("joint", "split"):
        mixture = _mixture(path, top_k=1).eval()
        kwargs = dict(attention_mask=mask, max_new_tokens=5, do_sample=False, eos_token_id=None)
        outs.append(mixture.generate(ids, num_beams=2, **kwargs))
    assert calls and torch.equal(outs[0], outs[1])


def test_t5_split_under_activation_checkpointing_matches_the_joint_path():
    """Checkpointing makes T5 hand cross-attention a zero bias that asks for a gradient; it leads nowhere."""
    ids, mask, decoder_ids = batch("left")
    results = []
    for path in ("joint", "split"):
        mixture = _mixture(path, combine="concat")
        inj.enable_activation_checkpointing(mixture.backbone)
        mixture.train()
        results.append(_step(mixture, ids, mask, decoder_ids))
    assert (results[0][0] - results[1][0]).abs().max().item() <= 1e-5
    for name, grad in results[0][1].items():
        assert (results[1][1][name] - grad).abs().max().item() <= 1e-5 * max(1.0, grad.abs().max().item()), name


def test_t5_position_bias_that_trains_keeps_the_joint_path():
    """The fused kernels return no gradient for their mask: a trained relative-attention table cannot split."""
    table = ("encoder.block.0.layer.0.SelfAttention.relative_attention_bias",)
    ids, mask, decoder_ids = batch("right")
    split = _mixture("split", train_modules=table).train()
    with pytest.raises(ValueError, match="position bias needs a gradient"):
        split(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    with torch.no_grad():  # nothing needs a gradient: the split runs
        split(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids)
    auto = _mixture("auto", train_modules=table).train()
    auto(input_ids=ids, attention_mask=mask, decoder_input_ids=decoder_ids).logits.sum().backward()
    weight = auto.backbone.encoder.block[0].layer[0].SelfAttention.relative_attention_bias.weight
    assert weight.grad is not None and weight.grad.abs().max() > 0
