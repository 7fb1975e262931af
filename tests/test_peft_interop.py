"""PEFT prefix-tuning adapters in and out of moe_prefix, checked against PEFT itself."""

import pytest
import torch
from conftest import batch, real_diff, tiny_gpt2, tiny_llama
from safetensors.torch import save_file

from moe_prefix import PrefixConfig, attach
from moe_prefix.peft_interop import (
    attach_peft_adapters,
    export_peft_adapter,
    load_peft_prefix,
    peft_position_ids,
)

peft = pytest.importorskip("peft")
BUILDS = {"gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models run ~100x slower with two intra-op threads on a loaded 2-core machine."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def peft_prefix_model(model, P, projection=False, seed=1):
    cfg = peft.PrefixTuningConfig(
        task_type="CAUSAL_LM",
        num_virtual_tokens=P,
        prefix_projection=projection,
        encoder_hidden_size=24 if projection else None,
    )
    peft_model = peft.get_peft_model(model, cfg).eval()
    torch.manual_seed(seed)
    with torch.no_grad():
        for p in peft_model.prompt_encoder.parameters():
            p.normal_()
    return peft_model


# -- PEFT -> moe_prefix ---------------------------------------------------------------------------------
@pytest.mark.parametrize("projection", [False, True], ids=["plain", "projection"])
@pytest.mark.parametrize("name", sorted(BUILDS))
def test_peft_adapter_loads_with_identical_logits(name, projection, tmp_path):
    P = 5
    ids, mask = batch(pad_side="left")
    peft_model = peft_prefix_model(BUILDS[name](), P, projection)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.save_pretrained(tmp_path)
    mixture = attach_peft_adapters(BUILDS[name](), tmp_path).eval()
    assert mixture.cfg.num_experts == 1 and mixture.cfg.prefix_len == P
    with torch.no_grad():
        got = mixture(input_ids=ids, attention_mask=mask, position_ids=peft_position_ids(ids, P)).logits
    assert real_diff(got, expected, mask) <= 1e-5


def test_raw_prefix_encoder_weights_are_projected(tmp_path):
    """A folder with PEFT's training-time MLP weights (not its projected output) gives the same prefix."""
    P = 4
    ids, mask = batch(pad_side="left")
    peft_model = peft_prefix_model(tiny_llama(), P, projection=True)
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=mask).logits
    peft_model.save_pretrained(tmp_path)
    raw = {n: p.detach() for n, p in peft_model.named_parameters() if n.startswith("prompt_encoder.")}
    assert any(n.endswith("transform.2.weight") for n in raw)
    save_file(raw, str(tmp_path / "adapter_model.safetensors"))
    mixture = attach_peft_adapters(tiny_llama(), tmp_path).eval()
    with torch.no_grad():
        got = mixture(input_ids=ids, attention_mask=mask, position_ids=peft_position_ids(ids, P)).logits
    assert real_diff(got, expected, mask) <= 1e-5


# -- moe_prefix -> PEFT ---------------------------------------------------------------------------------
def routed_mixture(model, cfg, blend):
    """A mixture whose router sends group 0 to the fixed blend and group 1 to expert 1 alone."""
    mixture = attach(model, cfg).eval()
    one_hot = torch.full((cfg.num_experts,), -1e4)
    one_hot[1] = 0.0
    with torch.no_grad():
        mixture.router.proj.weight.copy_(torch.stack([torch.tensor(blend).log(), one_hot], dim=1))
    return mixture


@pytest.mark.parametrize(
    "name, reparam",
    [("gpt2", False), ("llama", False), ("llama", True)],
    ids=["gpt2", "llama", "llama-reparam"],
)
def test_exported_expert_and_blend_match_in_peft(name, reparam, tmp_path):
    P, blend = 4, [0.2, 0.5, 0.3]
    cfg = PrefixConfig(
        num_experts=3,
        prefix_len=P,
        routing="soft",
        router_input="group",
        num_groups=2,
        init_std=1.0,
        reparam=reparam,
    )
    torch.manual_seed(3)
    mixture = routed_mixture(BUILDS[name](), cfg, blend)
    ids, mask = batch(pad_side="left")
    positions = peft_position_ids(ids, P)
    for group, kwargs in ((1, {"expert": 1}), (0, {"routing": blend})):
        folder = export_peft_adapter(mixture, tmp_path / str(group), **kwargs)
        groups = torch.full((ids.shape[0],), group)
        with torch.no_grad():
            got = mixture(input_ids=ids, attention_mask=mask, group_ids=groups, position_ids=positions)
            peft_model = peft.PeftModel.from_pretrained(BUILDS[name](), folder).eval()
            expected = peft_model(input_ids=ids, attention_mask=mask).logits
        assert got.routing.weights[0, 1].item() == pytest.approx(1.0 if group else 0.5)
        assert real_diff(got.logits, expected, mask) <= 1e-5
    kv, config = load_peft_prefix(tmp_path / "1", mixture.dims)
    assert torch.equal(kv, mixture.bank.tensor()[1].detach())
    assert config["task_type"] == "CAUSAL_LM"


def test_export_cuts_expert_lengths_and_keeps_the_position_convention(tmp_path):
    """With length=expert the adapter holds only the kept positions; PEFT then offsets by that length."""
    cfg = PrefixConfig(
        num_experts=3,
        prefix_len=5,
        routing="soft",
        router_input="group",
        num_groups=2,
        length="expert",
        expert_lengths=(5, 3, 2),
        init_std=1.0,
    )
    torch.manual_seed(4)
    mixture = routed_mixture(tiny_llama(), cfg, [0.5, 0.25, 0.25])  # blended length round(3.75) = 4
    ids, mask = batch(pad_side="left")
    for group, kwargs, kept in ((1, {"expert": 1}, 3), (0, {"routing": [0.5, 0.25, 0.25]}, 4)):
        folder = export_peft_adapter(mixture, tmp_path / str(group), **kwargs)
        assert load_peft_prefix(folder)[0].shape[-2] == kept
        groups = torch.full((ids.shape[0],), group)
        with torch.no_grad():
            got = mixture(
                input_ids=ids,
                attention_mask=mask,
                group_ids=groups,
                position_ids=peft_position_ids(ids, kept),
            ).logits
            expected = peft.PeftModel.from_pretrained(tiny_llama(), folder).eval()(input_ids=ids, attention_mask=mask)
        assert real_diff(got, expected.logits, mask) <= 1e-5


# -- upcycling --------------------------------------------------------------------------------------------
def task_ids(task: int, n: int, seed: int, t: int = 16):
    """Task 0 counts up through tokens 10..39; task 1 counts down by 3 through tokens 50..89."""
    g = torch.Generator().manual_seed(seed)
    if task == 0:
        return 10 + (torch.randint(0, 30, (n, 1), generator=g) + torch.arange(t)) % 30
    return 50 + (torch.randint(0, 40, (n, 1), generator=g) - 3 * torch.arange(t)) % 40


def train_peft_adapter(task: int, P: int, folder, steps: int = 40):
    torch.manual_seed(10 + task)
    model = peft.get_peft_model(tiny_llama(), peft.PrefixTuningConfig(task_type="CAUSAL_LM", num_virtual_tokens=P))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=0.05)
    for step in range(steps):
        ids = task_ids(task, 16, seed=100 * task + step)
        loss = model(input_ids=ids, labels=ids).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.save_pretrained(folder)


@pytest.mark.parametrize("order", [(0, 1), (1, 0)], ids=["up-down", "down-up"])
def test_upcycled_adapters_route_each_task_to_its_own_expert(order, tmp_path):
    """Both expert orders must pass, so a lucky initial router cannot: the routing has to be learned."""
    P = 4
    folders = [tmp_path / f"task{task}" for task in order]
    for task, folder in zip(order, folders, strict=True):
        train_peft_adapter(task, P, folder)
    # A top-1 router renormalised over one bank always weighs it 1: the task loss gives it no gradient.
    # So the router learns under soft routing (blend weights carry the LM loss) and is then used top-1.
    torch.manual_seed(0)
    soft = attach_peft_adapters(tiny_llama(), folders, routing="soft")
    soft.bank.kv.requires_grad_(False)
    opt = torch.optim.AdamW(soft.router.parameters(), lr=0.05)
    soft.train()
    for step in range(30):
        ids = torch.cat([task_ids(0, 8, seed=1000 + step), task_ids(1, 8, seed=2000 + step)])
        out = soft(input_ids=ids, labels=ids, position_ids=peft_position_ids(ids, P))
        loss = out.loss + out.routing.aux_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    top1 = attach_peft_adapters(tiny_llama(), folders)  # top_k=1 by default
    top1.router.load_state_dict(soft.router.state_dict())
    top1.eval()
    with torch.no_grad():
        for expert, task in enumerate(order):
            routing, _ = top1.prepare(task_ids(task, 64, seed=5000 + task))
            share = (routing.indices[:, 0] == expert).float().mean().item()
            assert share > 0.8, f"task {task}: only {share:.2f} of inputs went to its own adapter"


# -- errors -----------------------------------------------------------------------------------------------
def test_adapter_of_another_backbone_names_both_shapes(tmp_path):
    peft_prefix_model(tiny_gpt2(), 5).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"\(2, 2, 4, 5, 8\).*\(2, 2, 2, 5, 8\)"):
        attach_peft_adapters(tiny_llama(), tmp_path)


def test_non_prefix_adapter_is_rejected(tmp_path):
    lora = peft.get_peft_model(tiny_llama(), peft.LoraConfig(task_type="CAUSAL_LM", r=2))
    lora.save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="LORA.*PREFIX_TUNING"):
        load_peft_prefix(tmp_path)


def test_pickled_weights_are_refused(tmp_path):
    peft_prefix_model(tiny_llama(), 3).save_pretrained(tmp_path, safe_serialization=False)
    with pytest.raises(FileNotFoundError, match="adapter_model.bin.*safetensors"):
        load_peft_prefix(tmp_path)


def test_adapters_with_different_lengths_cannot_share_a_bank(tmp_path):
    for P in (3, 4):
        peft_prefix_model(tiny_llama(), P).save_pretrained(tmp_path / str(P))
    with pytest.raises(ValueError, match="num_virtual_tokens"):
        attach_peft_adapters(tiny_llama(), [tmp_path / "3", tmp_path / "4"])


@pytest.mark.parametrize(
    "overrides, kwargs, message",
    [
        ({"combine": "concat"}, {"routing": [0.5, 0.5]}, "concat"),
        ({"length": "learned"}, {"expert": 0}, "learned"),
        ({}, {"routing": [0.7, 0.7]}, "summing to one"),
        ({}, {}, "exactly one"),
    ],
)
def test_export_refuses_what_a_peft_prefix_cannot_hold(overrides, kwargs, message, tmp_path):
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=2, prefix_len=3, **overrides))
    with pytest.raises(ValueError, match=message):
        export_peft_adapter(mixture, tmp_path, **kwargs)


def test_position_ids_follow_peft():
    ids = torch.zeros(2, 3, dtype=torch.long)
    assert peft_position_ids(ids, 4).tolist() == [[4, 5, 6]] * 2
