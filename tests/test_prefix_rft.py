"""Prefix-RFT on a tiny Llama: the E2E slot matcher, GRPO's group advantages and clipped loss, the
demonstration schedule, rollouts through the routed prefix, a run that learns, resume and --init-from."""

import csv
import json
import math

import pytest
import torch
from conftest import NAMES
from test_generation import overrides

from moe_prefix.train import generation, rft
from moe_prefix.train.datamodule import pad_tokens
from moe_prefix.train.e2e_slots import check_slots, parse_mr, slot_error_rate
from moe_prefix.train.engine import fit
from moe_prefix.train.generation import GenerationModule
from moe_prefix.train.run_config import ConfigError, RLConfig, load_config

torch.set_num_threads(1)

# -- the slot matcher ----------------------------------------------------------------------------------------

MR = "name: Blue Spice, eatType: pub, food: English, area: riverside, familyFriendly: yes, near: Café Sicilia"


def errors(text: str, mr: str) -> dict[str, list[str]]:
    check = check_slots(text, mr)
    return {k: v for k, v in (("missing", check.missing), ("wrong", check.wrong), ("added", check.added)) if v}


def test_mr_parses_both_spellings_and_rejects_plain_text():
    want = [("name", "The Eagle"), ("eatType", "coffee shop"), ("customer rating", "5 out of 5")]
    assert parse_mr("name[The Eagle], eatType[coffee shop], customer rating[5 out of 5]") == want
    assert parse_mr("name: The Eagle, eatType: coffee shop, customerRating: 5 out of 5") == want
    assert parse_mr("name : alpha , food : pasta") == [("name", "alpha"), ("food", "pasta")]
    assert parse_mr("familyfriendly[yes]") == [("familyFriendly", "yes")]
    for text in ("", "a review of a film", "name: x, and more", "name[x] trailing words"):
        assert parse_mr(text) is None


def test_a_text_with_every_slot_has_no_error():
    text = "Blue Spice is a family-friendly pub serving English food by the riverside near Café Sicilia."
    assert errors(text, MR) == {}
    assert check_slots(text, MR).ser == 0.0


@pytest.mark.parametrize(
    ("value", "texts"),
    [
        ("yes", ["family friendly", "family-friendly", "kid friendly", "kids-friendly", "child friendly",
                 "children friendly", "good for families", "welcomes children"]),
        ("no", ["not family-friendly", "not family friendly", "isn't kid friendly", "not a child friendly",
                "adults only", "no children", "not suitable for families", "family unfriendly"]),
    ],
)  # fmt: skip
def test_family_friendly_wordings(value, texts):
    mr = f"name: Cocum, familyFriendly: {value}"
    other = "no" if value == "yes" else "yes"
    for text in texts:
        sentence = f"Cocum is {text}."
        assert errors(sentence, mr) == {}, sentence
        assert errors(sentence, f"name: Cocum, familyFriendly: {other}") == {"wrong": ["familyFriendly"]}, sentence


@pytest.mark.parametrize(
    ("value", "texts"),
    [
        ("cheap", ["cheap", "inexpensive", "low-priced", "affordable", "less than £20", "under £20"]),
        ("less than £20", ["cheap", "priced at less than £20"]),
        ("moderate", ["moderately priced", "average priced", "mid-range priced", "£20-25"]),
        ("£20-25", ["£20-25", "in the £20-£25 range", "moderately priced"]),
        ("high", ["expensive", "high priced", "in the high price range", "pricey", "more than £30"]),
        ("more than £30", ["more than £30", "over £30", "expensive"]),
    ],
)
def test_price_range_wordings(value, texts):
    for text in texts:
        assert errors(f"Cocum is {text}.", f"name: Cocum, priceRange: {value}") == {}, text
    wrong = {"cheap": "expensive", "less than £20": "expensive", "moderate": "cheap", "£20-25": "cheap"}
    other = wrong.get(value, "cheap")
    assert errors(f"Cocum is {other}.", f"name: Cocum, priceRange: {value}") == {"wrong": ["priceRange"]}


@pytest.mark.parametrize(
    ("value", "texts"),
    [
        ("low", ["a low customer rating", "rated low", "a poor rating", "one star"]),
        ("1 out of 5", ["a rating of 1 out of 5", "rated 1 out of 5 stars", "a low customer rating"]),
        ("average", ["an average customer rating", "average rated", "a customer rating of average"]),
        ("3 out of 5", ["a customer rating of 3 out of 5 stars", "a 3 star rating"]),
        ("high", ["highly rated", "a high customer rating", "a customer rating that is high", "five stars"]),
        ("5 out of 5", ["rated 5 out of 5", "a high customer rating"]),
    ],
)
def test_customer_rating_wordings(value, texts):
    mr = f"name: Cocum, customer rating: {value}"
    for text in texts:
        assert errors(f"Cocum has {text}.", mr) == {}, text
    other = "a low customer rating" if value in ("high", "5 out of 5", "average", "3 out of 5") else "five stars"
    assert errors(f"Cocum has {other}.", mr) == {"wrong": ["customer rating"]}


def test_a_high_price_is_not_a_high_rating_nor_out_of_5_stars_a_five_star_rating():
    assert errors("Cocum is a high priced pub.", "name: Cocum, eatType: pub, customer rating: high") == {
        "missing": ["customer rating"],
        "added": ["priceRange"],
    }
    assert errors("Cocum is rated 3 out of 5 stars.", "name: Cocum, customer rating: 3 out of 5") == {}


@pytest.mark.parametrize(
    ("key", "value", "text", "other"),
    [
        ("eatType", "coffee shop", "a coffee shop", "a pub"),
        ("eatType", "pub", "a pub", "a restaurant"),
        ("eatType", "restaurant", "a restaurant", "a coffee shop"),
        ("area", "riverside", "by the river", "in the city centre"),
        ("area", "riverside", "in the riverside area", "downtown"),
        ("area", "city centre", "in the city center", "by the riverside"),
        ("area", "city centre", "in the centre of the city", "on the river"),
        ("food", "Fast food", "serving fast-food", "serving French food"),
        ("food", "English", "serving British food", "serving Italian food"),
        ("food", "Japanese", "serving Japanese food", "serving Chinese food"),
    ],
)
def test_closed_slot_wordings_and_wrong_values(key, value, text, other):
    mr = f"name: Cocum, {key}: {value}"
    assert errors(f"Cocum is {text}.", mr) == {}
    assert errors(f"Cocum is {other}.", mr) == {"wrong": [key]}
    # the right value beside a wrong one is wrong too: a text cannot win by listing every value
    assert errors(f"Cocum is {text}, {other}.", mr) == {"wrong": [key]}
    assert errors("Cocum.", mr) == {"missing": [key]}


def test_names_match_without_accents_or_article_and_are_not_read_as_other_slots():
    mr = "name: The Rice Boat, eatType: pub, near: Raja Indian Cuisine"
    assert errors("Rice Boat is a pub near Raja Indian Cuisine.", mr) == {}  # no food[Indian] added
    assert errors("The Rice Boat is a pub.", mr) == {"missing": ["near"]}
    assert errors("A pub near Raja Indian Cuisine.", mr) == {"missing": ["name"]}
    cafe = "name: Cocum, eatType: pub, near: Café Sicilia"
    assert errors("Cocum is a pub near Cafe Sicilia.", cafe) == {}  # no coffee shop from the café's name
    assert errors("Cocum is a pub near Café Sicilia.", cafe) == {}


def test_slots_outside_the_mr_are_added_errors_and_ser_counts_all_kinds():
    mr = "name: Cocum, eatType: pub, area: riverside"
    text = "Cocum is a cheap, family friendly coffee shop serving sushi."  # 1 wrong, 1 missing, 3 added
    check = check_slots(text, mr)
    assert check.wrong == ["eatType"] and check.missing == ["area"]
    assert sorted(check.added) == ["familyFriendly", "food", "priceRange"]
    assert check.ser == pytest.approx(5 / 3)
    # over a corpus, errors and slots are summed before the division
    texts, mrs = ["Cocum is a pub by the river.", "Cocum is a pub."], [mr, mr]
    assert slot_error_rate(texts, mrs) == pytest.approx(1 / 6)


def test_slots_outside_the_ontology_match_their_words():
    assert errors("alpha serves pasta in the north .", "name : alpha , food : pasta , area : north") == {}
    assert errors("alpha serves curry .", "name : alpha , food : pasta") == {"missing": ["food"]}


def test_slots_copied_in_mr_syntax_are_not_realised():
    """Copying the input would otherwise score SER 0: a policy trained on -SER learnt to write `key: value`."""
    mr = "name: Cocum, eatType: pub, familyFriendly: yes, near: The Sorrento"
    missing = {"missing": ["name", "near", "eatType", "familyFriendly"]}
    assert errors(mr, mr) == missing
    assert errors("name[Cocum], eatType[pub], familyFriendly[yes], near[The Sorrento]", mr) == missing
    assert errors("Cocum is a pub, familyFriendly: yes, near: The Sorrento", mr) == {
        "missing": ["near", "familyFriendly"]
    }
    # prose that merely contains the words is untouched
    assert errors("Cocum is a family-friendly pub near The Sorrento.", mr) == {}


# -- the objective -------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scale", [True, False])
def test_group_advantages_sum_to_zero_per_group(scale):
    g = torch.Generator().manual_seed(0)
    rewards = torch.randn(5 * 4, generator=g)
    rewards[8:12] = 0.5  # one group whose rewards are all equal: no advantage at all
    advantages = rft.group_advantages(rewards, group_size=4, scale=scale).view(5, 4)
    assert torch.allclose(advantages.sum(-1), torch.zeros(5), atol=1e-5)
    assert torch.equal(advantages[2], torch.zeros(4))
    if scale:
        others = advantages[[0, 1, 3, 4]]
        assert torch.allclose(others.std(-1, unbiased=False), torch.ones(4), atol=1e-4)
    else:
        assert torch.allclose(advantages, (rewards.view(5, 4) - rewards.view(5, 4).mean(-1, keepdim=True)))


def test_clipped_loss_holds_tokens_whose_ratio_left_the_trust_region():
    old = torch.log(torch.full((2, 3), 0.5))
    # ratios 1.5, 1.1, 0.5 (row 0, advantage +1) and 1.5, 1.1, 0.5 (row 1, advantage -1)
    logp = (old + torch.log(torch.tensor([[1.5, 1.1, 0.5], [1.5, 1.1, 0.5]]))).requires_grad_()
    advantages, mask = torch.tensor([1.0, -1.0]), torch.ones(2, 3, dtype=torch.bool)
    loss, held = rft.clipped_policy_loss(logp, old, advantages, mask, clip=0.2)
    loss.backward()
    ratio = torch.tensor([[1.5, 1.1, 0.5], [1.5, 1.1, 0.5]])
    # d/dlogp of -min(rho A, clip(rho) A) / N: -A rho / N where the unclipped term is the minimum, else 0
    active = torch.tensor([[False, True, True], [True, True, False]])
    want = torch.where(active, -advantages[:, None] * ratio / 6, torch.zeros(()))
    assert torch.allclose(logp.grad, want)
    assert held == pytest.approx(2 / 6)  # ratio 1.5 with A > 0, ratio 0.5 with A < 0
    # ratio 1 (the step's own samples): the gradient is -A / N on every token, nothing held
    logp = old.clone().requires_grad_()
    loss, held = rft.clipped_policy_loss(logp, old, advantages, mask, clip=0.2)
    loss.backward()
    assert torch.allclose(logp.grad, -advantages[:, None].expand(2, 3) / 6) and held == 0


def test_demonstration_bound_follows_the_cosine():
    total, start, end = 11, 0.95, 0.05
    bounds = [rft.demo_fraction_bound(s, total, start, end) for s in range(total)]
    assert bounds[0] == pytest.approx(start) and bounds[-1] == pytest.approx(end)
    assert bounds[5] == pytest.approx((start + end) / 2)
    for s, u in enumerate(bounds):
        assert u == pytest.approx(end + (start - end) * (1 + math.cos(math.pi * s / (total - 1))) / 2)
    assert all(a > b for a, b in zip(bounds, bounds[1:], strict=False))


def test_demonstration_lengths_lie_within_the_bound_for_the_first_of_each_group():
    torch.manual_seed(0)
    refs = [10, 20, 7]
    lengths = rft.demo_lengths(refs, group_size=4, num_demo=2, bound=0.6, low=0.1).view(3, 4)
    assert lengths[:, 2:].eq(0).all()
    for n, row in zip(refs, lengths[:, :2], strict=True):
        assert row.ge(math.ceil(0.1 * n)).all() and row.le(math.ceil(0.6 * n)).all()
    draws = rft.demo_lengths([100] * 200, group_size=1, num_demo=1, bound=0.6, low=0.1).float() / 100
    assert 0.3 < draws.mean() < 0.4  # f ~ U(0.1, 0.6), mean 0.35


def test_entropy_clipping_keeps_the_highest_entropy_share_of_each_rows_demonstration():
    entropy = torch.tensor([[0.1, 3.0, 2.0, 0.5, 9.0, 1.0], [5.0, 4.0, 3.0, 2.0, 1.0, 0.0]])
    demo = torch.tensor([[True, True, True, True, False, True], [False, True, True, True, False, False]])
    kept = rft.top_entropy_mask(entropy, demo, 0.2)  # ceil(0.2 * 5) = 1, ceil(0.2 * 3) = 1
    assert kept.tolist() == [[False, True, False, False, False, False], [False, True, False, False, False, False]]
    kept = rft.top_entropy_mask(entropy, demo, 0.5)  # ceil(2.5) = 3, ceil(1.5) = 2
    assert kept.sum(-1).tolist() == [3, 2] and not (kept & ~demo).any()
    assert kept[0, [1, 2, 5]].all() and not kept[0, 4]  # position 4 has entropy 9 but is no demonstration token


# -- rollouts through the routed prefix --------------------------------------------------------------------


def write_pasta_jsonl(path):
    """A task a prefix alone can learn: every input asks for pasta (the names would need copying)."""
    with open(path, "w") as f:
        for name in NAMES:
            mr = f"name : {name} , food : pasta"
            for ref in (f"{name} serves pasta .", f"a pasta place is {name} ."):
                f.write(json.dumps({"mr": mr, "ref": ref}) + "\n")
    return path


@pytest.fixture(scope="module")
def pasta(tmp_path_factory):
    return write_pasta_jsonl(tmp_path_factory.mktemp("data") / "pasta.jsonl")


def rl_overrides(lm, data, run_dir, **extra):
    values = {
        "optim.objective": "prefix_rft",
        "optim.schedule": "constant",
        "optim.lr": 0.3,
        "data.val_fraction": 0.5,
        "rl.group_size": 4,
        "rl.demo_share": 0.5,
        "rl.max_new_tokens": 6,
        **extra,
    }
    return overrides(lm, data, run_dir, **values)


@pytest.fixture(scope="module")
def built_rl(tiny_lm_dir, pasta, tmp_path_factory):
    cfg = load_config(None, rl_overrides(tiny_lm_dir, pasta, tmp_path_factory.mktemp("unused")))
    built = generation.build(cfg)
    module = generation.make_module(built, cfg)
    return cfg, built, module


def _step(cfg, built, module, seed=0, step=0, total=10):
    torch.manual_seed(seed)
    batch = built.data.collate(built.data.train_set[:4])
    records = [module.train_records[i] for i in batch["index"].tolist()]
    stops = rft.stop_tokens(built.tokenizer, module.single_line)
    return rft.rl_step(built.network, batch, records, cfg, (step, total), built.tokenizer, module.decode, stops), batch


def test_rollouts_continue_the_demonstration_and_end_at_eos(built_rl):
    cfg, built, module = built_rl
    torch.manual_seed(0)
    batch = built.data.collate(built.data.train_set[:3])
    prompts, refs = rft.split_pairs(batch, built.tokenizer.eos_token_id)
    assert all(r and built.tokenizer.eos_token_id not in r for r in refs)
    lengths = torch.tensor([2, 0, 0, 0, 3, 0, 0, 0, 1, 0, 0, 0])
    mixture = built.network.mixture
    ids, mask = pad_tokens(prompts, built.tokenizer.pad_token_id, left=True)
    _, state = mixture.prepare(ids, mask)
    stops = rft.stop_tokens(built.tokenizer, module.single_line)
    out = rft.sample_rollouts(built.network, state, prompts, refs, lengths, cfg.rl, stops, 0)
    assert out.input_ids.shape[0] == 12 and out.sampled.any(-1).all()
    for r in range(12):
        i, n = r // 4, int(lengths[r])
        demo = out.input_ids[r][out.demo[r]].tolist()
        assert demo == refs[i][:n]
        sampled = out.input_ids[r][out.sampled[r]].tolist()
        assert out.tokens[r] == demo + [t for t in sampled if t not in stops]
        assert all(t not in stops for t in sampled[:-1])  # only the last sampled token may end the text
        real = out.input_ids[r][out.attention_mask[r].bool()].tolist()
        assert real == prompts[i] + demo + sampled  # prompt, demonstration, continuation: nothing in between


def test_scoring_forward_reproduces_the_sampling_policy(built_rl):
    """pi_old is the sampler: the trained forward, on the same routed prefix, gives generate()'s own logits."""
    cfg, built, module = built_rl
    torch.manual_seed(1)
    batch = built.data.collate(built.data.train_set[:3])
    prompts, refs = rft.split_pairs(batch, built.tokenizer.eos_token_id)
    mixture = built.network.mixture
    mixture.train()  # router noise on, as in training: the state fixes one draw for sampling and scoring
    ids, mask = pad_tokens(prompts, 0, left=True)
    _, state = mixture.prepare(ids, mask)
    given, given_mask = pad_tokens([p for p in prompts for _ in range(2)], 0, left=True)
    gen = built.network.generate(
        given, given_mask, state=state, do_sample=True, top_k=0, max_new_tokens=5, eos_token_id=[99],
        pad_token_id=0, return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    t0 = given.shape[1]
    mask = torch.cat([given_mask, torch.ones_like(gen.sequences[:, t0:])], 1)  # eos 99 never comes: 5 new each
    logits = rft.policy_logits(built.network, state, gen.sequences, mask)
    for k, step_logits in enumerate(gen.logits):
        assert torch.allclose(logits[:, t0 - 1 + k], step_logits, atol=1e-4)
    mixture.eval()


def test_equal_rewards_give_no_policy_gradient(built_rl, monkeypatch):
    cfg, built, module = built_rl
    params = [p for p in built.network.parameters() if p.requires_grad]
    step, _ = _step(cfg, built, module)
    grads = torch.autograd.grad(step.loss, params, allow_unused=True)
    assert any(g is not None and g.abs().sum() > 0 for g in grads), "varied rewards should move the prefix"

    def constant(texts, mrs, references, bleu_weight):
        return torch.full((len(texts),), -0.5), [0.5] * len(texts)

    monkeypatch.setattr(rft, "rollout_rewards", constant)
    step, _ = _step(cfg, built, module)
    assert step.logs["train/reward"] == -0.5 and step.logs["train/advantage_std"] == 0
    for g in torch.autograd.grad(step.loss, params, allow_unused=True):
        assert g is None or torch.equal(g, torch.zeros_like(g))


def test_sft_anchor_adds_the_references_cross_entropy(tiny_lm_dir, pasta, tmp_path, monkeypatch):
    """rl.sft_weight w: the step's loss is the clipped objective plus w times SFT's loss on the same batch, so
    with equal rewards (no policy gradient) what trains is exactly w times SFT."""
    cfg = load_config(None, rl_overrides(tiny_lm_dir, pasta, tmp_path, **{"rl.sft_weight": 0.5}))
    built = generation.build(cfg)
    module = generation.make_module(built, cfg)
    built.network.eval()  # no router noise: the anchor's forward and the reference one below route alike
    monkeypatch.setattr(rft, "rollout_rewards", lambda texts, *_: (torch.full((len(texts),), -0.5), [0.5] * len(texts)))
    params = [p for p in built.network.parameters() if p.requires_grad]
    batch = built.data.collate(built.data.train_set[:4])
    torch.manual_seed(0)
    loss, _ = module.rl_step(batch)
    losses, scored, _ = module.forward_pairs(batch)
    sft = losses[scored].mean()
    assert loss.item() == pytest.approx(0.5 * sft.item(), rel=1e-5)
    for got, want in zip(torch.autograd.grad(loss.sum(), params), torch.autograd.grad(0.5 * sft, params), strict=True):
        assert torch.allclose(got, want, atol=1e-6)


def test_rl_step_logs_and_rows(built_rl):
    cfg, built, module = built_rl
    step, batch = _step(cfg, built, module, step=0, total=10)
    g = cfg.rl.group_size
    assert len(step.rows) == 4 * g
    assert [r["demo_tokens"] > 0 for r in step.rows[:g]] == [True, True, False, False]  # demo_share 0.5
    assert {"train/reward", "train/reward_scratch", "train/ser", "train/advantage_std", "train/demo_bound"} <= set(
        step.logs
    )
    assert step.logs["train/demo_bound"] == pytest.approx(cfg.rl.demo_max_fraction)
    for row in step.rows:
        assert row["reward"] == pytest.approx(-row["ser"])  # bleu_weight 0: the reward is -SER
    assert step.routing.weights.shape[0] == 4  # routed once per input, not per sample


def test_objective_and_rl_keys_are_checked():
    with pytest.raises(ConfigError, match=r"optim.objective='grpo' is not one of sft, rft, prefix_rft"):
        load_config(None, ["optim.objective=grpo"])
    with pytest.raises(ConfigError, match=r"rl.group_size=1 must be >= 2"):
        load_config(None, ["rl.group_size=1"])
    with pytest.raises(ConfigError, match=r"rl.demo_min_fraction=0.5 must lie in \[0, rl.demo_max_fraction=0.4\]"):
        RLConfig(demo_max_fraction=0.4, demo_min_fraction=0.5)
    with pytest.raises(ConfigError, match=r"optim.objective=rft needs model.task=generation"):
        load_config(None, ["optim.objective=rft"])


def test_study_configs_differ_from_the_sft_config_only_in_objective_batch_and_steps():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "configs"
    sft = load_config(root / "e2e_smollm2.yaml")
    for name, objective in (("e2e_rft.yaml", "rft"), ("e2e_prefix_rft.yaml", "prefix_rft")):
        cfg = load_config(root / name)
        assert cfg.optim.objective == objective and cfg.model == sft.model
        assert cfg.prefix == sft.prefix  # so --init-from an SFT run of e2e_smollm2.yaml fits
        assert {k: v for k, v in vars(cfg.data).items() if k != "batch_size"} == {
            k: v for k, v in vars(sft.data).items() if k != "batch_size"
        }
        assert cfg.generation == sft.generation and cfg.threads == 1


def test_rft_on_inputs_that_are_no_meaning_representations_needs_a_bleu_reward(tiny_lm_dir, tmp_path):
    path = tmp_path / "free.jsonl"
    path.write_text("".join(json.dumps({"mr": f"say {n}", "ref": f"{n} ."}) + "\n" for n in NAMES))
    cfg = load_config(None, rl_overrides(tiny_lm_dir, path, tmp_path / "run"))
    with pytest.raises(ConfigError, match="needs E2E meaning representations.*rl.bleu_weight > 0"):
        fit(cfg)
    assert not (tmp_path / "run").exists()


def test_val_ser_is_reported_only_for_meaning_representations(built_rl, monkeypatch):
    cfg, built, module = built_rl
    logged = {}
    monkeypatch.setattr(module, "log_dict", lambda values, **_: logged.update(values))
    row = {"index": 0, "id": "a", "references": ["x ."], "new_tokens": 2, "input_len": 3}
    module.rows = [row | {"input": "name : alpha , food : pasta", "prediction": "alpha serves curry ."}]
    module.on_validation_epoch_end()
    assert logged["val/ser"] == pytest.approx(50.0)
    logged.clear()
    module.rows = [row | {"input": "say alpha", "prediction": "alpha ."}]
    module.on_validation_epoch_end()
    assert "val/bleu" in logged and "val/ser" not in logged


# -- runs ---------------------------------------------------------------------------------------------------


@pytest.mark.slow  # two tiny fits, ~4 s
def test_prefix_rft_run_raises_the_mean_reward(tiny_lm_dir, pasta, tmp_path):
    """The mean reward (-SER) of the policy's greedy texts on held-out inputs, untrained and after 30 steps."""
    # 6 training inputs, 12 pairs; groups of 8, 2 of them from a demonstration (seeds 0-3 all learn "pasta")
    task = {"data.val_fraction": 0.25, "rl.group_size": 8, "rl.demo_share": 0.25, "trainer.max_steps": 30}
    before = fit(load_config(None, rl_overrides(tiny_lm_dir, pasta, tmp_path / "a", **task, **{"optim.lr": 1e-9})))
    after = fit(load_config(None, rl_overrides(tiny_lm_dir, pasta, tmp_path / "b", **task)))
    assert before.metrics["val/ser"] > after.metrics["val/ser"]  # val/ser = -100 * mean reward
    assert after.metrics["val/ser"] <= 50.0  # "pasta" learnt; names would need copying from the prompt
    rows = [r for r in csv.DictReader(open(after.run_dir / "logs" / "metrics.csv")) if r.get("train/demo_bound")]
    bounds = [float(r["train/demo_bound"]) for r in rows]
    want = [rft.demo_fraction_bound(int(r["step"]), 30, 0.95, 0.05) for r in rows]
    assert len(rows) == 30 and bounds == pytest.approx(want, abs=1e-5)
    rollouts = [json.loads(line) for line in (after.run_dir / "rollouts.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rollouts[::8]] == sorted(r["step"] for r in rollouts[::8])
    assert {r["step"] for r in rollouts} == {26, 27, 28, 29}  # rl.rollouts_saved = 4: the last steps
    assert len(rollouts) == 8 * (8 + 4 + 8 + 4)  # groups of 8 over batches of 8 and 4 pairs
    assert set(rollouts[0]) == {"step", "id", "input", "demo_tokens", "text", "reward", "ser", "advantage"}


@pytest.mark.slow  # whole fits
def test_killed_rl_run_resumes_to_the_weights_of_an_uninterrupted_one(tiny_lm_dir, pasta, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    steps_run, kill_at = [], []
    original = GenerationModule.training_step

    def counted(self, batch, batch_idx):
        if kill_at and self.global_step == kill_at[0]:
            raise RuntimeError("killed")
        steps_run.append(self.global_step)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GenerationModule, "training_step", counted)
    extra = {"trainer.max_steps": 7, "checkpoint_every_n_steps": 2, "rl.demo_share": 0.25}

    def run(run_dir, resume=False):
        steps_run.clear()
        cfg = load_config(None, rl_overrides(tiny_lm_dir, pasta, run_dir, **extra))
        return load_file(str(fit(cfg, resume=resume).run_dir / "adapter.safetensors"))

    straight = run(tmp_path / "straight")
    kill_at.append(5)
    with pytest.raises(RuntimeError, match="killed"):
        run(tmp_path / "resumed")
    (tmp_path / "resumed" / "checkpoints" / "interrupted.ckpt").unlink()  # a kill leaves no parting checkpoint
    kill_at.clear()
    resumed = run(tmp_path / "resumed", resume=True)
    assert steps_run == [4, 5, 6]  # from the step-4 checkpoint: the same rollouts are drawn again
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


@pytest.mark.slow  # whole fits
def test_init_from_starts_prefix_rft_from_a_finished_sft_run(tiny_lm_dir, pasta, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from moe_prefix.tools.cli import fit_command
    from moe_prefix.train.networks import trainable_state_dict

    sft = fit(load_config(None, overrides(tiny_lm_dir, pasta, tmp_path / "sft", **{"data.val_fraction": 0.5})))
    trained = load_file(str(sft.run_dir / "adapter.safetensors"))
    seen = {}
    monkeypatch.setattr(
        GenerationModule,
        "on_train_start",
        lambda self: seen.update({k: v.clone() for k, v in trainable_state_dict(self.network).items()}),
    )
    args = rl_overrides(tiny_lm_dir, pasta, tmp_path / "rft", **{"trainer.max_steps": 1})
    assert fit_command(None, args, None, str(sft.run_dir)) == 0
    assert seen.keys() == trained.keys() and all(torch.equal(seen[k], trained[k]) for k in trained)
    nowhere = rl_overrides(tiny_lm_dir, pasta, tmp_path / "x", **{"model.init_from": "nowhere"})
    with pytest.raises(ConfigError, match="model.init_from='nowhere' is not a finished run directory"):
        fit(load_config(None, nowhere))
    assert not (tmp_path / "x").exists()
