"""prefix.expert_rank: expert e = base ⊙ (1 + U_e V_e), one base prefix shared by every expert.

References nobody here wrote: PEFT's prefix adapter (an untrained factorised mixture is exactly the adapter
holding its base; an exported fixed routing after training is PEFT's logits), and the formula written out
element by element.
"""

import pytest
import torch
from conftest import batch, fixed_routing_against_peft, real_diff, tiny_gpt2, tiny_llama

from moe_prefix import PrefixConfig, attach
from moe_prefix.peft_interop import load_peft_prefix, peft_position_ids

peft = pytest.importorskip("peft")


def factorised(rank=2, **overrides) -> PrefixConfig:
    cfg = dict(num_experts=3, prefix_len=4, top_k=2, expert_rank=rank, init_std=0.5, router_init="random")
    return PrefixConfig(**{**cfg, **overrides})


def perturb_factors(mixture, seed=0):
    """What training does to the factors, drawn at once: experts then differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in (mixture.bank.factor_rows, mixture.bank.factor_cols):
            p.copy_(torch.randn(p.shape, generator=generator) * 0.5)


def test_each_expert_is_the_base_times_one_plus_its_low_rank_factor():
    torch.manual_seed(0)
    mixture = attach(tiny_llama(), factorised())
    perturb_factors(mixture)
    bank = mixture.bank
    got = bank.tensor().detach()
    E, L, C, H, P, D = got.shape
    U, V, base = bank.factor_rows.detach(), bank.factor_cols.detach(), bank.base.detach()
    for e, layer, c, h, p, d in [(0, 0, 0, 0, 0, 0), (2, 1, 1, 1, 3, 7), (1, 1, 0, 1, 2, 5)]:
        factor = sum(U[e, p, r] * V[e, r, layer, c, h, d] for r in range(U.shape[-1]))
        assert got[e, layer, c, h, p, d].item() == pytest.approx((base[layer, c, h, p, d] * (1 + factor)).item(), 1e-6)
    # Parameters: one base plus r * (p + l*c*h*d) per expert, not E full banks.
    count = sum(p.numel() for p in bank.parameters())
    assert count == L * C * H * P * D + E * 2 * (P + L * C * H * D)


@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_before_training_every_routing_gives_the_peft_adapter_holding_the_base(build, tmp_path):
    P = 4
    peft_model = peft.get_peft_model(build(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    torch.manual_seed(1)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_()
    peft_model.save_pretrained(tmp_path)
    ids, mask = batch(pad_side="left")
    with torch.no_grad():
        expected = peft_model.eval()(input_ids=ids, attention_mask=mask).logits
    mixture = attach(build(), factorised(prefix_len=P)).eval()
    kv, _ = load_peft_prefix(tmp_path, mixture.dims)
    with torch.no_grad():
        mixture.bank.base.copy_(kv)
        got = mixture(input_ids=ids, attention_mask=mask, position_ids=peft_position_ids(ids, P)).logits
    assert real_diff(got, expected, mask) <= 1e-5
    # The factors alone make the experts differ: without them the check above would hold for any model.
    perturb_factors(mixture)
    with torch.no_grad():
        moved = mixture(input_ids=ids, attention_mask=mask, position_ids=peft_position_ids(ids, P)).logits
    assert real_diff(moved, expected, mask) > 1e-3


def test_exported_fixed_routing_of_trained_factors_gives_peft_logits(tmp_path):
    blend = [0.2, 0.5, 0.3]
    cfg = factorised(routing="soft", router_input="group", num_groups=1)
    torch.manual_seed(3)
    mixture = attach(tiny_llama(), cfg).eval()
    perturb_factors(mixture, seed=4)
    got, expected, mask, _ = fixed_routing_against_peft(mixture, blend, 4, tmp_path)
    assert real_diff(got, expected, mask) <= 1e-5


def test_every_input_trains_the_base_and_its_experts_factors_then_fold_and_reload_keep_outputs():
    mixture = attach(tiny_llama(), factorised(rank=1, top_k=1)).train()
    ids, mask = batch(pad_side="right")
    out = mixture(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    (out.loss + out.routing.aux_loss).backward()
    bank = mixture.bank
    chosen = out.routing.indices.unique()
    assert bank.base.grad.abs().sum() > 0
    # U starts at zero, so the first step moves U of the chosen experts only (and no V yet).
    grads = bank.factor_rows.grad.abs().flatten(1).sum(1)
    assert (grads[chosen] > 0).all() and (grads.sum() == grads[chosen].sum())
    assert bank.factor_cols.grad.abs().sum() == 0
    perturb_factors(mixture)
    mixture.eval()
    with torch.no_grad():
        before = mixture(input_ids=ids, attention_mask=mask).logits
        mixture.fold()
        after = mixture(input_ids=ids, attention_mask=mask).logits
    assert bank.folded and not hasattr(bank, "factor_rows") and real_diff(before, after, mask) <= 1e-6
    state = mixture.trainable_state_dict()
    reloaded = attach(tiny_llama(), factorised(rank=1, top_k=1))
    reloaded.fold()
    reloaded.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids, attention_mask=mask).logits, after)


def test_the_shared_part_is_never_factorised():
    mixture = attach(tiny_llama(), factorised(shared_len=2))
    assert mixture.shared.folded and hasattr(mixture.bank, "base")


def test_expert_rank_is_checked():
    with pytest.raises(ValueError, match="expert_rank must be >= 0"):
        PrefixConfig(expert_rank=-1)
    for clash in (dict(reparam=True), dict(init="tokens"), dict(expert_init="upcycle")):
        with pytest.raises(ValueError, match="cannot be combined"):
            PrefixConfig(expert_rank=1, **clash)
