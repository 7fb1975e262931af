"""prefix.expert_init=upcycle: a trained one-expert prefix becomes every expert of a mixture."""

import pytest
import torch
from conftest import batch, tiny_llama, tiny_run_overrides
from safetensors.torch import load_file

from moe_prefix import PrefixConfig, attach
from moe_prefix.tools.ablate import Sweep, arm_steps
from moe_prefix.train.engine import fit, load_run
from moe_prefix.train.run_config import ConfigError, load_config


def test_upcycled_experts_are_the_source_prefix_plus_seeded_noise():
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=3, prefix_len=4, top_k=2))
    source = torch.randn(2, 2, 2, 4, 8)  # (l c h p d)
    mixture.bank.upcycle(source, noise=0.0, seed=0)
    assert all(torch.equal(mixture.bank.kv[e].detach(), source) for e in range(3))
    mixture.bank.upcycle(source, noise=0.01, seed=0)
    first = mixture.bank.kv.detach().clone()
    offset = first - source
    assert 0.005 < (offset.std() / source.std()).item() < 0.02  # 1 % of the source's spread
    assert not torch.equal(first[0], first[1])  # the noise breaks the experts' symmetry
    mixture.bank.upcycle(source, noise=0.01, seed=0)
    assert torch.equal(mixture.bank.kv.detach(), first)  # seeded


def test_upcycled_mixture_computes_the_source_prefix_before_its_first_step():
    """Identical experts blended with weights summing to one are the source prefix itself, whatever the router."""
    ids, mask = batch(pad_side="left")
    single = attach(tiny_llama(), PrefixConfig(num_experts=1, prefix_len=4, top_k=1, init_std=0.5)).eval()
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=4, prefix_len=4, top_k=2)).eval()
    mixture.bank.upcycle(single.bank.tensor()[0].detach(), noise=0.0, seed=0)
    with torch.no_grad():
        expected = single(input_ids=ids, attention_mask=mask).logits
        got = mixture(input_ids=ids, attention_mask=mask).logits
    assert (got - expected)[mask.bool()].abs().max() <= 1e-5


def test_upcycling_a_bank_of_another_shape_names_both():
    mixture = attach(tiny_llama(), PrefixConfig(num_experts=2, prefix_len=4))
    with pytest.raises(ValueError, match="same prefix_len"):
        mixture.bank.upcycle(torch.zeros(2, 2, 2, 3, 8), noise=0.0, seed=0)


def test_upcycle_needs_a_run_to_start_from():
    with pytest.raises(ConfigError, match="model.init_from"):
        load_config(None, ["prefix.expert_init=upcycle"])


def test_chained_arm_counts_both_stages_steps():
    sweep = Sweep(
        None,
        {
            "mixture": ["trainer.max_steps=100"],
            "source": ["prefix.num_experts=1", "prefix.top_k=1", "trainer.max_steps=40"],
            "upcycled": ["prefix.expert_init=upcycle", "model.init_from=@source", "trainer.max_steps=60"],
            "epochs": [],
        },
    )
    assert arm_steps(sweep) == {"mixture": 100, "source": 40, "upcycled": 100, "epochs": None}


@pytest.mark.parametrize("name", ["multisource", "multisource_shared", "vader"])
def test_shared_structure_studies_give_every_tested_arm_the_same_budget(name):
    from moe_prefix.tools.ablate import load_sweep

    sweep = load_sweep(f"configs/ablations/shared_structure_{name}.yaml")
    budgets = {arm: n for arm, n in arm_steps(sweep).items() if arm not in ("upcycle_src", "shared_upcycle_src")}
    assert len(set(budgets.values())) == 1 and None not in budgets.values(), budgets


@pytest.mark.slow
def test_fit_upcycles_a_finished_one_expert_run(tiny_backbone_dir, reviews_csv, tmp_path):
    source = fit(
        load_config(
            None,
            tiny_run_overrides(
                tiny_backbone_dir, reviews_csv, tmp_path / "source", **{"prefix.num_experts": 1, "prefix.shared_len": 2}
            ),
        )
    ).run_dir
    overrides = tiny_run_overrides(
        tiny_backbone_dir,
        reviews_csv,
        tmp_path / "upcycled",
        **{
            "prefix.num_experts": 3,
            "prefix.shared_len": 2,
            "prefix.expert_init": "upcycle",
            "prefix.upcycle_noise": 0.0,
            "model.init_from": str(source),
            "trainer.max_steps": 1,
            "optim.lr": 1e-12,  # one step that moves nothing: what is left is the upcycled start
        },
    )
    upcycled = fit(load_config(None, overrides)).run_dir
    before, after = load_file(str(source / "adapter.safetensors")), load_file(str(upcycled / "adapter.safetensors"))
    assert after["body.bank.kv"].shape[0] == 3
    for e in range(3):
        torch.testing.assert_close(after["body.bank.kv"][e], before["body.bank.kv"][0], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["body.shared.kv"], before["body.shared.kv"], rtol=0, atol=1e-6)
    torch.testing.assert_close(after["head.weight"], before["head.weight"], rtol=0, atol=1e-6)
    cfg, built = load_run(upcycled)
    assert cfg.prefix.expert_init == "upcycle" and built.network.mixture.cfg.num_experts == 3
    with pytest.raises(ConfigError, match="one-expert prefix run"):
        fit(load_config(None, [*overrides, f"run_dir={tmp_path / 'again'}", f"model.init_from={upcycled}"]))
