"""prefix.shared_len: positions every input attends to with weight one, beside the routed banks.

References nobody here wrote: PEFT's prefix adapter (the shared part alone, and shared + one routed choice
exported), and the outputs of the code before the shared part existed (shared_len=0).
"""

import numpy as np
import pytest
import torch
from conftest import batch, fixed_routing_against_peft, real_diff, tiny_gpt2, tiny_llama

from moe_prefix import PrefixConfig, attach
from moe_prefix.analysis.probes import prefix_attention_mass
from moe_prefix.peft_interop import load_peft_prefix, peft_position_ids

peft = pytest.importorskip("peft")


# Logits of the mixture below, computed by the code before prefix.shared_len existed (commit 7e055ec):
# sum over (b t vocab) and logits[0, -1, :4].
BEFORE_SHARED = {
    "blend": (
        -16.274886661358323,
        [-0.05147021636366844, 0.19150660932064056, 0.0285580363124609, -0.13591404259204865],
    ),
    "concat": (
        -16.13368468878616,
        [-0.053047217428684235, 0.19048058986663818, 0.02892291732132435, -0.13356012105941772],
    ),
}


@pytest.mark.parametrize("combine", ["blend", "concat"])
def test_shared_len_zero_gives_the_outputs_of_before(combine):
    torch.manual_seed(5)
    cfg = PrefixConfig(
        num_experts=3,
        prefix_len=4,
        top_k=2,
        combine=combine,
        init_std=0.5,
        router_init="random",
        balanced_routing=False,
        balance_free_choices=False,
        balance_coef=0.01,
        shared_len=0,
    )
    mixture = attach(tiny_llama(), cfg).eval()
    assert mixture.shared is None and not any(name.startswith("shared.") for name in mixture.trainable_state_dict())
    ids, mask = batch(pad_side="left")
    with torch.no_grad():
        logits = mixture(input_ids=ids, attention_mask=mask).logits
    total, row = BEFORE_SHARED[combine]
    assert logits.double().sum().item() == pytest.approx(total, abs=1e-5)
    assert torch.allclose(logits[0, -1, :4], torch.tensor(row), rtol=0, atol=1e-6)


def peft_adapter(model, P, folder, seed=1):
    cfg = peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P)
    peft_model = peft.get_peft_model(model, cfg).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_()
    peft_model.save_pretrained(folder)
    return peft_model


@pytest.mark.parametrize("combine", ["blend", "concat"])
@pytest.mark.parametrize("build", [tiny_gpt2, tiny_llama], ids=["gpt2", "llama"])
def test_routed_banks_switched_off_leave_exactly_the_peft_adapter_of_the_shared_part(build, combine, tmp_path):
    S = 5
    ids, mask = batch(pad_side="left")
    peft_model = peft_adapter(build(), S, tmp_path)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    # Every routed bank has length 0 at evaluation: only the shared positions remain.
    cfg = PrefixConfig(
        num_experts=3, prefix_len=4, top_k=2, combine=combine, length="expert", expert_lengths=(0, 0, 0), shared_len=S
    )
    mixture = attach(build(), cfg).eval()
    kv, _ = load_peft_prefix(tmp_path, mixture.dims)
    mixture.shared.set_from_activations(kv[None])
    with torch.no_grad():
        got = mixture(input_ids=ids, attention_mask=mask, position_ids=peft_position_ids(ids, S)).logits
    assert real_diff(got, expected, mask) <= 1e-5


@pytest.mark.parametrize("reparam", [False, True], ids=["plain", "reparam"])
def test_exported_fixed_routing_carries_the_shared_part_into_peft(reparam, tmp_path):
    S, P, blend = 3, 4, [0.2, 0.5, 0.3]
    cfg = PrefixConfig(
        num_experts=3,
        prefix_len=P,
        shared_len=S,
        routing="soft",
        router_input="group",
        num_groups=1,
        init_std=1.0,
        reparam=reparam,
        reparam_dim=8,
        reparam_hidden=16,
    )
    torch.manual_seed(3)
    mixture = attach(tiny_llama(), cfg).eval()
    got, expected, mask, folder = fixed_routing_against_peft(mixture, blend, S + P, tmp_path)
    assert real_diff(got, expected, mask) <= 1e-5
    kv, _ = load_peft_prefix(folder, mixture.dims)
    assert kv.shape[-2] == S + P
    assert torch.equal(kv[..., :S, :], mixture.shared.tensor()[0].detach())


@pytest.mark.parametrize("combine", ["blend", "concat"])
def test_attention_mass_splits_into_shared_and_routed_parts(combine):
    cfg = PrefixConfig(num_experts=3, prefix_len=4, top_k=2, combine=combine, shared_len=2, init_std=1.0)
    mixture = attach(tiny_llama(), cfg)
    ids, mask = batch(pad_side="right")
    with_shared = prefix_attention_mass(mixture, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    shared, total = with_shared["shared"], with_shared["total"]
    assert shared.shape == total.shape and (shared > 0).all() and (shared < total).all()
    if combine == "concat":  # the routed experts' blocks and the shared block make up the total
        assert abs(shared + np.nansum(with_shared["per_expert"], -1) - total).max() <= 1e-5
    # The routed banks cut to length 0: all the mass is on the shared positions.
    off = PrefixConfig(
        num_experts=3, prefix_len=4, top_k=2, combine=combine, shared_len=2, length="expert", expert_lengths=(0, 0, 0)
    )
    only_shared = attach(tiny_llama(), off)
    only_shared.shared.load_state_dict(mixture.shared.state_dict())
    mass = prefix_attention_mass(only_shared, [{"input_ids": ids, "attention_mask": mask}], progress=False)
    assert abs(mass["shared"] - mass["total"]).max() <= 1e-6
    no_shared = attach(tiny_llama(), PrefixConfig(num_experts=3, prefix_len=4, top_k=2, combine=combine))
    assert (
        prefix_attention_mass(no_shared, [{"input_ids": ids, "attention_mask": mask}], progress=False)["shared"] is None
    )


def test_shared_part_trains_folds_and_checkpoints():
    cfg = PrefixConfig(
        num_experts=2, prefix_len=3, top_k=1, shared_len=2, reparam=True, reparam_dim=8, reparam_hidden=16
    )
    mixture = attach(tiny_llama(), cfg).train()
    ids, mask = batch(pad_side="right")
    out = mixture(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    (out.loss + out.routing.aux_loss).backward()
    assert mixture.shared.embedding.grad.abs().sum() > 0 and mixture.shared.mlp[2].weight.grad.abs().sum() > 0
    mixture.eval()
    with torch.no_grad():
        before = mixture(input_ids=ids, attention_mask=mask).logits
        mixture.fold()
        after = mixture(input_ids=ids, attention_mask=mask).logits
    assert mixture.shared.folded and real_diff(before, after, mask) <= 1e-6
    state = mixture.trainable_state_dict()
    assert state["shared.kv"].shape == (1, 2, 2, 2, 2, 8)  # (e l c h s d)
    reloaded = attach(tiny_llama(), cfg)
    reloaded.fold()
    reloaded.load_state_dict(state, strict=False)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(input_ids=ids, attention_mask=mask).logits, after)


def test_init_from_text_fills_the_shared_part_with_real_token_keys():
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=2, prefix_len=3, shared_len=2, init="tokens"))
    ids, mask = batch(b=4, t=8, pad_side="left")
    mixture.init_from_text(ids, mask)
    shared, bank = mixture.shared.tensor().detach(), mixture.bank.tensor().detach()
    assert shared.abs().sum() > 0 and not torch.equal(shared[0, ..., :1, :], bank[0, ..., :1, :])


def test_shared_len_is_checked():
    with pytest.raises(ValueError, match="shared_len must be >= 0"):
        PrefixConfig(shared_len=-1)
    with pytest.raises(ValueError, match="decoupled"):
        PrefixConfig(shared_len=2, prefix_mode="decoupled")
