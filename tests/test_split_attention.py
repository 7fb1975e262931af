"""The split attention path (tokens on the fused kernel, merged by log-sum-exp) against the joint path."""

import pytest
import torch
from conftest import FAMILIES, batch, tiny_bert, tiny_llama

from moe_prefix import PrefixConfig, attach
from moe_prefix import injection as inj
from moe_prefix.split_attention import fused_kernel, split_attention

TOL = {torch.float32: 1e-5, torch.float64: 1e-10}
# (family, padding): BERT is bidirectional (right padding); the causal ones take both sides, and none at all.
CASES = [("bert", "right"), ("bert", None), ("gpt2", "right"), ("gpt2", "left"), ("llama", "right"), ("llama", "left")]
CASES += [("llama", None)]
PREFIXES = {
    "blend-fixed": {},
    "concat-fixed": {"combine": "concat"},
    "blend-learned": {"length": "learned", "length_tau": 2.0},
    "concat-learned": {"combine": "concat", "length": "learned", "length_tau": 2.0},
}


def _inputs(padding):
    ids, mask = batch(b=3, t=9, pad_side=padding or "right")
    return ids, (torch.ones_like(mask) if padding is None else mask)


def _mixture(name, path, dtype, **overrides):
    cfg = PrefixConfig(num_experts=3, prefix_len=4, top_k=2, init_std=1.0, attention_path=path, **overrides)
    mixture = attach(FAMILIES[name]().to(dtype), cfg).to(dtype)
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():  # spread routing and lengths, so gates and length masks differ between examples
        mixture.router.proj.weight.copy_(torch.randn(mixture.router.proj.weight.shape, generator=g))
        if cfg.length == "learned":
            weight = mixture.length.head[1].weight
            weight.copy_(torch.randn(weight.shape, generator=g) / weight.shape[1] ** 0.5)
    return mixture


def _step(mixture, ids, mask):
    """Training-mode forward (router noise seeded) and backward of a loss on real tokens only.

    Returns the outputs (logits, and the last hidden state on real tokens: BERT's logits see one token) and
    the gradients of every trainable tensor.
    """
    mixture.train()
    mixture.backbone.eval()
    torch.manual_seed(7)
    out = mixture(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    logits = out.logits[mask.bool()] if out.logits.dim() == 3 else out.logits
    outputs = torch.cat([logits.flatten(), out.hidden_states[-1][mask.bool()].flatten()])
    w = torch.randn(outputs.shape, generator=torch.Generator().manual_seed(11)).to(outputs)
    ((outputs * w).sum() + out.routing.aux_loss).backward()
    grads = {n: p.grad.clone() for n, p in mixture.named_parameters() if p.grad is not None}
    return outputs.detach(), grads


def _count_split_calls(monkeypatch):
    calls = []
    original = inj.split_attention
    monkeypatch.setattr(inj, "split_attention", lambda *a, **k: calls.append(1) or original(*a, **k))
    return calls


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("prefix", sorted(PREFIXES))
@pytest.mark.parametrize("name,padding", CASES, ids=[f"{n}-{p or 'nopad'}" for n, p in CASES])
def test_split_equals_joint_outputs_and_gradients(name, padding, prefix, dtype, monkeypatch):
    ids, mask = _inputs(padding)
    calls = _count_split_calls(monkeypatch)
    results = {path: _step(_mixture(name, path, dtype, **PREFIXES[prefix]), ids, mask) for path in ("joint", "split")}
    assert len(calls) == 2  # one split call per layer; the joint mixture never reached it
    (out_joint, grads_joint), (out_split, grads_split) = results["joint"], results["split"]
    assert (out_split - out_joint).abs().max().item() <= TOL[dtype]
    expected = {"bank.kv", "router.proj.weight"} | ({"length.head.1.weight"} if "learned" in prefix else set())
    assert expected <= set(grads_joint) and set(grads_joint) == set(grads_split)
    for key, grad in grads_joint.items():
        assert grad.abs().max() > 0, key
        assert (grads_split[key] - grad).abs().max().item() <= TOL[dtype], key


@pytest.mark.parametrize("name,padding", CASES, ids=[f"{n}-{p or 'nopad'}" for n, p in CASES])
def test_split_equals_joint_in_evaluation_with_hard_lengths(name, padding):
    """Evaluation truncates learned lengths and masks the rest with -inf biases."""
    ids, mask = _inputs(padding)
    outs = []
    for path in ("joint", "split"):
        mixture = _mixture(name, path, torch.float32, length="learned").eval()
        with torch.no_grad():
            mixture.length.head[1].bias.fill_(0.0)  # lengths around the middle: some positions masked
            out = mixture(input_ids=ids, attention_mask=mask)
        assert out.routing.lengths.min() < 4
        outs.append(out.logits[mask.bool()] if out.logits.dim() == 3 else out.logits)
    assert (outs[0] - outs[1]).abs().max().item() <= 1e-5


def test_auto_keeps_the_joint_path_on_the_cpu_and_eager(monkeypatch):
    """On the CPU sdpa's fused kernel takes the joint mask itself; eager attention never splits."""
    calls = _count_split_calls(monkeypatch)
    ids, mask = _inputs("left")
    _mixture("llama", "auto", torch.float32)(input_ids=ids, attention_mask=mask)
    _mixture("llama", "joint", torch.float32)(input_ids=ids, attention_mask=mask)
    assert not calls
    _mixture("llama", "split", torch.float32)(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2


def test_attention_dropout_in_training_falls_back_to_the_joint_path(monkeypatch):
    """The fused CPU kernel has no dropout: auto keeps the joint path's draws, split refuses."""
    calls = _count_split_calls(monkeypatch)
    ids, mask = _inputs("right")
    outs = []
    for path in ("auto", "joint"):  # auto would be joint on the CPU anyway: the point is that neither splits
        model = tiny_bert(attention_probs_dropout_prob=0.5).train()
        mixture = attach(model, PrefixConfig(num_experts=2, prefix_len=3, attention_path=path))
        torch.manual_seed(0)
        outs.append(mixture(input_ids=ids, attention_mask=mask).logits)
    assert not calls and torch.equal(outs[0], outs[1])
    mixture.cfg.attention_path = "split"
    model.eval()  # no dropout at evaluation: the split applies again
    with torch.no_grad():
        mixture(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2
    model.train()
    with pytest.raises(ValueError, match="attention dropout in training"):
        mixture(input_ids=ids, attention_mask=mask)


def test_split_refuses_eager_attention():
    model = tiny_llama()
    model.set_attn_implementation("eager")
    mixture = attach(model, PrefixConfig(num_experts=2, prefix_len=3, attention_path="split"))
    ids, mask = _inputs("left")
    with pytest.raises(ValueError, match="eager"):
        mixture(input_ids=ids, attention_mask=mask)


def test_attention_path_is_validated():
    with pytest.raises(ValueError, match="attention_path='fast' is not one of auto, split, joint"):
        PrefixConfig(attention_path="fast")


@pytest.mark.parametrize("padding", ["right", "left", None])
def test_masks_are_built_once_per_forward(padding, monkeypatch):
    """Every layer gets the same token mask object: converted once per forward, not once per layer."""
    seen = []
    original = inj.split_attention
    monkeypatch.setattr(inj, "split_attention", lambda *a: seen.append(a[6:8]) or original(*a))
    mixture = attach(tiny_llama(num_hidden_layers=4), PrefixConfig(num_experts=2, prefix_len=3, attention_path="split"))
    with torch.no_grad():
        mixture(*_inputs(padding))
    assert len(seen) == 4 and len({id(mask) for mask, _ in seen}) == 1
    # Left padding needs the mask; right padding and none run the kernel with is_causal and no mask.
    mask, causal = seen[0]
    assert (mask is None) == causal == (padding != "left")


def test_generate_with_beams_matches_the_joint_path():
    ids, mask = _inputs("left")
    outs = []
    for path in ("joint", "split"):
        mixture = _mixture("llama", path, torch.float32).eval()
        outs.append(
            mixture.generate(input_ids=ids, attention_mask=mask, max_new_tokens=5, num_beams=2, do_sample=False)
        )
    assert torch.equal(outs[0], outs[1])


def test_split_under_activation_checkpointing_matches_the_joint_path():
    ids, mask = _inputs("left")
    results = []
    for path in ("joint", "split"):
        mixture = _mixture("llama", path, torch.float32)
        inj.enable_activation_checkpointing(mixture.backbone)
        mixture.backbone.train()  # checkpointing recomputes only in training mode; tiny_llama has no dropout
        results.append(_step_checkpointed(mixture, ids, mask))
    for key in results[0]:
        assert (results[0][key] - results[1][key]).abs().max().item() <= 1e-5, key


def _step_checkpointed(mixture, ids, mask):
    torch.manual_seed(7)
    out = mixture(input_ids=ids, attention_mask=mask)
    out.logits[mask.bool()].square().sum().backward()
    return {n: p.grad.clone() for n, p in mixture.named_parameters() if p.grad is not None}


def test_split_under_bf16_autocast_is_as_accurate_as_the_joint_path():
    """bf16-mixed training: against fp32, both paths err by bf16 rounding only (the prefix part keeps fp32)."""
    ids, mask = _inputs("left")
    out_ref, grads_ref = _step(_mixture("llama", "joint", torch.float32), ids, mask)
    references = {"outputs": out_ref, **grads_ref}
    errors = {}
    for path in ("joint", "split"):
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out, grads = _step(_mixture("llama", path, torch.float32), ids, mask)
        got = {"outputs": out, **grads}
        errors[path] = {k: ((got[k] - ref).norm() / ref.norm()).item() for k, ref in references.items()}
    # The split rounds twice where sdpa rounds once (the kernel's output, then the merge): a small factor.
    for key in references:
        assert errors["split"][key] <= max(3 * errors["joint"][key], 0.01), errors


def _attention_inputs(device, dtype, masked):
    """Random inputs of split_attention with grouped-query heads (4 query heads over 2 key/value heads)."""
    g = torch.Generator().manual_seed(0)
    b, h, kv, q, p, d = 2, 4, 2, 8, 3, 16

    def rand(*shape):
        return torch.randn(*shape, generator=g).to(device=device, dtype=dtype).requires_grad_()

    query, key, value = rand(b, q, h, d).transpose(1, 2), rand(b, kv, q, d), rand(b, kv, q, d)
    prefix_key, prefix_value, bias = rand(b, kv, p, d), rand(b, kv, p, d), rand(b, p)
    keep = torch.ones(b, q, dtype=torch.bool)
    keep[1, :3] = False  # left padding: the first query rows of example 1 see no token at all
    allowed = torch.ones(q, q, dtype=torch.bool).tril() & keep[:, None, None, :]
    mask = torch.zeros(b, 1, q, q, dtype=dtype).masked_fill(~allowed, torch.finfo(dtype).min).to(device)
    return (query, key, value, prefix_key, prefix_value, bias), (mask if masked else None)


def _joint_reference(query, key, value, prefix_key, prefix_value, bias, mask, scale):
    """sdpa over [prefix, tokens] with the joint additive mask (causal when no mask is given)."""
    b, _, q, _ = query.shape
    if mask is None:
        causal = torch.ones(q, q, dtype=torch.bool, device=query.device).tril()
        mask = torch.zeros(1, 1, q, q, dtype=query.dtype, device=query.device).masked_fill(~causal, float("-inf"))
    joint = torch.cat([bias.to(query.dtype)[:, None, None, :].expand(b, 1, q, -1), mask.expand(b, 1, q, q)], -1)
    keys, values = torch.cat([prefix_key, key], 2), torch.cat([prefix_value, value], 2)
    groups = query.shape[1] // key.shape[1]
    keys, values = keys.repeat_interleave(groups, 1), values.repeat_interleave(groups, 1)
    out = torch.nn.functional.scaled_dot_product_attention(query, keys, values, attn_mask=joint, scale=scale)
    return out.transpose(1, 2)


def _check_split_attention(device, dtype, masked, tol):
    tensors, mask = _attention_inputs(device, dtype, masked)
    scale = 0.25
    kernel_mask, causal = None, True
    if masked:  # as the attention function prepares it (on CUDA: rows padded for the efficient kernel)
        kernel_mask, causal = inj._token_mask(inj.PrefixState(kv=None), mask, tensors[0], True)
    kernel = fused_kernel(tensors[0], masked)
    got = split_attention(*tensors, kernel_mask, causal, scale, kernel)
    expected = _joint_reference(*tensors, mask, scale)
    grad = torch.randn(expected.shape, generator=torch.Generator().manual_seed(1)).to(device=device, dtype=dtype)
    got_grads = torch.autograd.grad(got, tensors, grad)
    expected_grads = torch.autograd.grad(expected, tensors, grad)
    assert (got.float() - expected.float()).abs().max().item() <= tol
    names = ("query", "key", "value", "prefix_key", "prefix_value", "bias")
    for name, a, b in zip(names, got_grads, expected_grads, strict=True):
        assert a.shape == b.shape, name
        assert (a.float() - b.float()).abs().max().item() <= tol * max(1.0, b.abs().max().item()), name


@pytest.mark.parametrize("masked", [True, False], ids=["mask", "is_causal"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_split_attention_matches_sdpa_over_prefix_and_tokens(dtype, masked):
    _check_split_attention("cpu", dtype, masked, TOL[dtype])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("masked", [True, False], ids=["efficient", "flash"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
def test_split_attention_on_cuda(dtype, masked):
    """flash (no mask, half precision) or memory-efficient (mask, or fp32) for the token part."""
    kernel = fused_kernel(torch.empty(1, 1, 1, 16, device="cuda", dtype=dtype), masked)
    assert kernel == ("flash" if dtype == torch.bfloat16 and not masked else "efficient")
    _check_split_attention("cuda", dtype, masked, 2e-2 if dtype == torch.bfloat16 else 1e-4)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("padding", ["right", "left", None])
def test_split_equals_joint_on_cuda(padding):
    ids, mask = (x.cuda() for x in _inputs(padding))
    results = [_step(_mixture("llama", path, torch.float32).cuda(), ids, mask) for path in ("joint", "split")]
    (out_joint, grads_joint), (out_split, grads_split) = results
    assert (out_split - out_joint).abs().max().item() <= 1e-4
    for key, grad in grads_joint.items():
        assert (grads_split[key] - grad).abs().max().item() <= 1e-4 * max(1.0, grad.abs().max().item()), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_auto_splits_on_cuda(monkeypatch):
    calls = _count_split_calls(monkeypatch)
    ids, mask = (x.cuda() for x in _inputs("left"))
    _mixture("llama", "auto", torch.float32).cuda()(input_ids=ids, attention_mask=mask)
    assert len(calls) == 2


def test_a_generation_batch_routed_from_its_prompt_still_runs_tokens_with_is_causal(monkeypatch):
    """CausalLM routes from the prompt alone; the split path must still see the whole sequence's mask to know a
    right-padded training batch is plain causal (flash with is_causal rather than the masked kernel)."""
    from moe_prefix.train.networks import CausalLM
    from moe_prefix.train.run_config import ModelConfig

    cfg = PrefixConfig(num_experts=2, prefix_len=3, top_k=1, router_init="random", attention_path="split")
    network = CausalLM(tiny_llama(), ModelConfig(task="generation"), cfg)
    seen = []
    token_mask = inj._token_mask

    def spy(*args, **kwargs):
        mask, causal = token_mask(*args, **kwargs)
        seen.append(causal)
        return mask, causal

    monkeypatch.setattr(inj, "_token_mask", spy)
    ids, mask = batch(b=3, t=9, pad_side="right")
    prompt, prompt_mask = ids[:, :4], mask[:, :4]
    network(ids, mask, labels=ids, router_input_ids=prompt, router_attention_mask=prompt_mask)
    assert seen and all(seen)
