"""Generation on a tiny Llama: loss masking, decoding through the routed prefix, scores, fit end to end."""

import json
import random

import pytest
import torch
from conftest import AREAS, EOS, FOODS, NAMES

from moe_prefix.injection import STATE_KWARG
from moe_prefix.train.engine import evaluate_run, fit
from moe_prefix.train.generation import GenerationModule, build
from moe_prefix.train.generation import generation_scores as scores
from moe_prefix.train.run_config import load_config

torch.set_num_threads(1)


def write_descriptions_jsonl(path, seed=0):
    """E2E-like rows {input, target}: 24 distinct inputs (some without an area) with 1-3 references each."""
    rng = random.Random(seed)
    with open(path, "w") as f:
        for name in NAMES:
            for food in FOODS:
                area = rng.choice([*AREAS, None])
                source = f"name : {name} , food : {food}" + (f" , area : {area}" if area else "")
                where = f" in the {area}" if area else ""
                targets = [
                    f"{name} serves {food}{where} .",
                    f"{name} is a {food} place{where} .",
                    f"{where} , {name} serves {food} ." if area else f"a {food} place is {name} .",
                ][: rng.randint(1, 3)]
                for target in targets:
                    f.write(json.dumps({"mr": source, "ref": target.strip()}) + "\n")
    return path


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory):
    return write_descriptions_jsonl(tmp_path_factory.mktemp("data") / "descriptions.jsonl")


def overrides(backbone, source, run_dir, **extra):
    values = {
        "model.backbone": backbone,
        "model.task": "generation",
        "model.max_length": 32,
        "data.source": source,
        "data.text_column": "mr",
        "data.label_column": "ref",
        "data.group_column": None,
        "data.prompt_format": "'{input} :'",  # quoted: YAML reads a bare {...} as a mapping
        "data.batch_size": 8,
        "data.eval_batch_size": 5,
        "data.val_fraction": 0.25,
        "prefix.num_experts": 3,
        "prefix.prefix_len": 4,
        "prefix.top_k": 2,
        "prefix.init_std": 0.5,
        "generation.max_new_tokens": 6,
        "generation.num_samples_saved": 4,
        "trainer.max_steps": 6,
        "trainer.log_every_n_steps": 1,
        "trainer.max_epochs": 50,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.limit_val_batches": 0,
        "run_dir": run_dir,
        "checkpoint_every_n_steps": 3,
        "optim.lr": 0.05,
        **extra,
    }
    return [f"{k}={'null' if v is None else v}" for k, v in values.items()]


def _spread_router(network, std=3.0):
    """Large router weights, so that inputs of one batch pick different banks."""
    g = torch.Generator().manual_seed(0)
    proj = network.mixture.router.proj.weight
    with torch.no_grad():
        proj.copy_(torch.randn(proj.shape, generator=g) * std)


@pytest.fixture(scope="module")
def built(tiny_lm_dir, descriptions, tmp_path_factory):
    cfg = load_config(None, overrides(tiny_lm_dir, descriptions, tmp_path_factory.mktemp("unused")))
    tokenizer, data, network = build(cfg)
    _spread_router(network)
    network.eval()
    return cfg, tokenizer, data, network


def test_split_is_by_input_and_pairs_cover_every_reference(built):
    _, _, data, _ = built
    train_inputs = {r["input"] for r in data.train_examples}
    val_inputs = {r["input"] for r in data.val_examples}
    assert len(train_inputs) + len(val_inputs) == 24 and not train_inputs & val_inputs
    assert len(data.train_set) == sum(len(r["targets"]) for r in data.train_examples)
    assert len(data.val_pairs) == sum(len(r["targets"]) for r in data.val_examples)
    assert len(data.val_prompts) == len(data.val_examples) == 6


def test_jsonl_rows_group_by_input_and_a_missing_column_is_named(descriptions, tmp_path):
    from moe_prefix.train.data import load_generation_records as load_records
    from moe_prefix.train.records import DataError

    records = load_records(str(descriptions), "mr", "ref")
    assert len(records) == 24 and len({r["input"] for r in records}) == 24
    assert sum(len(r["targets"]) for r in records) == len(descriptions.read_text().splitlines())
    with pytest.raises(DataError, match="no column 'target'.*set data.label_column"):
        load_records(str(descriptions), "mr", "target")


def test_labels_mask_exactly_prompt_and_padding(built):
    _, tokenizer, data, _ = built
    items = data.train_set[:8]
    batch = data.collate(items)
    for i, item in enumerate(items):
        record = data.train_examples[item.index]
        prompt = tokenizer(f"{record['input']} :")["input_ids"]
        n, p = len(item.input_ids), len(prompt)
        assert item.input_ids[:p] == prompt and item.input_ids[-1] == EOS
        assert batch["labels"][i, :p].eq(-100).all()
        assert torch.equal(batch["labels"][i, p:n], batch["input_ids"][i, p:n])
        assert batch["labels"][i, n:].eq(-100).all() and batch["attention_mask"][i, n:].eq(0).all()
        # the router sees the prompt alone
        assert batch["router_input_ids"][i, :p].tolist() == prompt
        assert batch["router_attention_mask"][i].sum() == p
    assert len({len(x.input_ids) for x in items}) > 1, "the batch should need padding"


def test_loss_is_the_mean_over_target_tokens_of_each_example_alone(built):
    cfg, tokenizer, data, network = built
    module = GenerationModule(network, cfg, tokenizer)
    batch = data.collate(data.train_set[:6])
    with torch.no_grad():
        losses, _ = module.model_step(batch)
    expected = []
    for i in range(6):
        real = batch["attention_mask"][i].bool()
        ids, labels = batch["input_ids"][i : i + 1, real], batch["labels"][i : i + 1, real]
        p = int(batch["router_attention_mask"][i].sum())
        with torch.no_grad():
            _, state = network.mixture.prepare(ids[:, :p], torch.ones_like(ids[:, :p]))
            logits = network.mixture.backbone(input_ids=ids, **{STATE_KWARG: state}).logits
        expected.append(torch.nn.functional.cross_entropy(logits[0, p - 1 : -1], labels[0, p:], reduction="none"))
    assert torch.allclose(losses, torch.cat(expected), atol=1e-5)


def test_training_loss_from_scored_logits_equals_the_backbones_own_loss(built):
    """The module maps only scored positions to the vocabulary; transformers' own loss (every position's
    logits, its own shift) must give the same mean and the same prefix gradients."""
    cfg, tokenizer, data, network = built
    module = GenerationModule(network, cfg, tokenizer)
    batch = data.collate(data.train_set[:8])
    losses, _ = module.model_step(batch)
    (mine,) = torch.autograd.grad(losses.mean(), next(network.mixture.bank.parameters()))
    _, state = network.mixture.prepare(batch["router_input_ids"], batch["router_attention_mask"])
    state.query_mask = batch["attention_mask"]
    ref = network.mixture.run_backbone(
        state, input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]
    ).loss
    (theirs,) = torch.autograd.grad(ref, next(network.mixture.bank.parameters()))
    assert losses.mean().item() == pytest.approx(ref.item(), rel=1e-5)
    assert torch.allclose(mine, theirs, atol=1e-6, rtol=1e-4)


def test_logits_at_equals_the_full_output_on_gemma3_with_soft_capping():
    """Gemma 3 soft-caps its logits after the output layer; with logits_at the capped values at the chosen
    positions must equal the full output's, for the mixture, LoRA and full fine-tuning."""
    from test_injection import tiny_gemma3

    from moe_prefix.config import PrefixConfig
    from moe_prefix.train.networks import CausalLM
    from moe_prefix.train.run_config import ModelConfig

    ids = torch.randint(3, 97, (3, 9))
    mask = torch.ones_like(ids)
    mask[0, 6:] = 0
    mask[2, 8:] = 0
    wanted = torch.zeros_like(ids, dtype=torch.bool)
    wanted[0, 3:5] = wanted[1, 2:8] = wanted[2, 5:7] = True
    prefix = PrefixConfig(num_experts=2, prefix_len=3, top_k=1, router_init="random", init_std=0.5)
    for method in ("prefix", "lora", "full"):
        backbone = tiny_gemma3()
        backbone.config.final_logit_softcapping = 2.0  # tight, so that capping shows in every logit
        network = CausalLM(backbone, ModelConfig(task="generation", method=method, lora_rank=2), prefix).eval()
        routed = {"router_input_ids": ids, "router_attention_mask": mask}
        with torch.no_grad():
            full = network(ids, mask, **routed).logits
            kept = network(ids, mask, logits_at=wanted, **routed).logits
        assert full.abs().max() < 2.0 and kept.shape == (int(wanted.sum()), 97), method
        assert torch.allclose(kept, full[wanted], atol=1e-6), method


def test_validation_runs_longest_first_and_rows_come_back_in_split_order(built):
    cfg, tokenizer, data, network = built
    pairs, prompts = data.val_dataloader()
    for loader, items in ((pairs, data.val_pairs), (prompts, data.val_prompts)):
        batches = list(loader)
        widths = [b["input_ids"].shape[1] for b in batches]
        assert widths == sorted(widths, reverse=True) and len(set(widths)) > 1
        assert sorted(i for b in batches for i in b["index"].tolist()) == sorted(x.index for x in items)
    module = GenerationModule(network, cfg, tokenizer)
    module.log_dict = lambda *args, **kwargs: None  # no trainer to log to
    module.on_validation_epoch_start()
    with torch.no_grad():
        for batch in prompts:
            module.validation_step(batch, 0, dataloader_idx=1)
    module.on_validation_epoch_end()
    assert [row["index"] for row in module.rows] == list(range(len(data.val_examples)))


def _greedy_alone(network, prompt: list[int], max_new: int) -> list[int]:
    """Step-by-step greedy decoding without a cache, prefix routed from the prompt."""
    seq = torch.tensor([prompt])
    with torch.no_grad():
        _, state = network.mixture.prepare(seq, torch.ones_like(seq))
        new = []
        for _ in range(max_new):
            logits = network.mixture.backbone(input_ids=seq, use_cache=False, **{STATE_KWARG: state}).logits
            token = int(logits[0, -1].argmax())
            if token == EOS:
                break
            new.append(token)
            seq = torch.cat([seq, torch.tensor([[token]])], 1)
    return new


def test_decoding_equals_stepwise_greedy_and_each_example_alone(built):
    cfg, tokenizer, data, network = built
    module = GenerationModule(network, cfg, tokenizer)
    batch = next(iter(data.generation_loader(data.val_prompts, data.val_examples)))
    assert batch["attention_mask"][:, 0].eq(0).any(), "the batch should be left-padded"
    tokens = module.generate_tokens(batch["input_ids"], batch["attention_mask"])
    routing = network.mixture.last_routing
    assert len({tuple(r) for r in routing.indices.tolist()}) > 1, "inputs should pick different experts"
    assert any(tokens), "nothing was generated"
    for i, item in enumerate(data.val_prompts[: len(tokens)]):
        assert tokens[i] == _greedy_alone(network, item.input_ids, cfg.generation.max_new_tokens)
        alone = torch.tensor([item.input_ids])
        assert module.generate_tokens(alone, torch.ones_like(alone)) == [tokens[i]]


def test_beam_search_decodes(built):
    cfg, tokenizer, data, network = built
    cfg = load_config(None, [*overrides(cfg.model.backbone, cfg.data.source, "x"), "generation.num_beams=3"])
    module = GenerationModule(network, cfg, tokenizer)
    batch = next(iter(data.generation_loader(data.val_prompts, data.val_examples)))
    tokens = module.generate_tokens(batch["input_ids"], batch["attention_mask"])
    assert len(tokens) == batch["input_ids"].shape[0]
    assert all(len(t) <= cfg.generation.max_new_tokens for t in tokens)


def test_scores_on_hand_made_examples():
    assert scores(["the cat sat on the mat ."], [["the cat sat on the mat ."]]) == {"bleu": 100.0, "rougeL": 100.0}
    # a matching reference among others scores 100
    refs = [["a dog ran", "the cat sat on the mat .", "something else"]]
    assert scores(["the cat sat on the mat ."], refs)["bleu"] == pytest.approx(100.0)
    # every n-gram matches, but the closest reference has 6 tokens: brevity penalty exp(1 - 6/5)
    got = scores(["a b c d e"], [["a b c d e f", "a b c d e f g h"]])
    assert got["bleu"] == pytest.approx(100 * torch.e ** (1 - 6 / 5), abs=1e-3)
    # ROUGE-L: LCS "cat is here" = 3 of 4 tokens both ways, F = 0.75; the best reference counts
    assert scores(["the cat is here"], [["a cat is here", "dog"]])["rougeL"] == pytest.approx(75.0)
    # LCS "a c" of "a b c" and "a c d e": P = 2/3, R = 2/4, F = 2PR / (P + R) = 4/7
    assert scores(["a b c"], [["a c d e"]])["rougeL"] == pytest.approx(100 * 4 / 7, abs=1e-3)
    assert scores(["x y z"], [["a b c"]]) == {"bleu": 0.0, "rougeL": 0.0}


def test_samples_are_shared_out_over_the_sources(tmp_path):
    """samples.jsonl of a mix sorted by source shows every source (round-robin, split order kept), not the first
    n inputs, which would all be the first source's; a single source keeps its first n and no source key."""
    from moe_prefix.train import run_dir as rd

    sizes = {"a": 5, "b": 1, "c": 3}
    rows = [{"id": f"{s}{i}", "source": s} for s in sizes for i in range(sizes[s])]
    rows = [{**row, "index": i, "prediction": "p", "references": ["r"]} for i, row in enumerate(rows)]

    def written(rows, n):
        rd.write_samples(tmp_path / "samples.jsonl", rows, n)
        return [json.loads(line) for line in (tmp_path / "samples.jsonl").read_text().splitlines()]

    five = written(list(reversed(rows)), 5)  # the rows' own order does not matter, their split index does
    assert [s["id"] for s in five] == ["a0", "a1", "b0", "c0", "c1"]
    assert set(five[0]) == {"id", "source", "prediction", "references"}
    assert [s["id"] for s in written(rows, 100)] == [r["id"] for r in rows]
    only_a = written([r for r in rows if r["source"] == "a"], 2)
    assert [s["id"] for s in only_a] == ["a0", "a1"] and set(only_a[0]) == {"id", "prediction", "references"}


@pytest.fixture(scope="module")
def fitted_run(tiny_lm_dir, descriptions, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("fit") / "run"
    return fit(load_config(None, overrides(tiny_lm_dir, descriptions, run_dir, **{"prefix.init": "tokens"})))


@pytest.mark.slow  # whole fits
def test_fit_generation_writes_the_run_directory(fitted_run):
    run = fitted_run.run_dir
    for name in ("config.yaml", "metrics.json", "adapter.safetensors", "routing.csv", "samples.jsonl"):
        assert (run / name).is_file(), name
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/bleu", "val/rougeL", "val/loss", "val/router_entropy", "val/load/e0"} <= set(metrics)
    assert 0 <= metrics["val/bleu"] <= 100 and 0 <= metrics["val/rougeL"] <= 100
    assert sum(metrics[f"val/weight/e{i}"] for i in range(3)) == pytest.approx(1.0, abs=1e-5)
    assert metrics["steps"] == 6
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(set(s) == {"id", "prediction", "references"} for s in samples)
    rows = (run / "routing.csv").read_text().strip().splitlines()
    assert rows[0] == "id,group,input_len,loss,new_tokens,bleu,rougeL,ser,slots,coverage,prefix_len,experts,w0,w1,w2"
    assert len(rows) - 1 == 6
    # the same run evaluated again reproduces its metrics; the bare backbone is scored on the same inputs
    again = evaluate_run(run).metrics
    assert again["val/bleu"] == pytest.approx(metrics["val/bleu"])
    assert again["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    bare = evaluate_run(run, no_prefix=True).metrics
    assert {"val/bleu", "val/rougeL", "val/loss"} <= set(bare) and "val/router_entropy" not in bare
    assert bare["val/loss"] != pytest.approx(metrics["val/loss"])
    bare_samples = [json.loads(line) for line in (run / "samples-val-noprefix.jsonl").read_text().splitlines()]
    assert [s["id"] for s in bare_samples] == [s["id"] for s in samples]


@pytest.mark.slow  # whole fits
def test_analyze_reports_the_prefix_attention_of_a_generation_run(fitted_run):
    from moe_prefix.tools.analyze import analyze_run

    text = analyze_run(fitted_run.run_dir, progress=False).read_text()
    lam = text[text.index("## Prefix attention mass λ") : text.index("## Prefix lengths")]
    assert "validation pairs (prompt + reference, teacher-forced; routed from the prompt)" in lam
    assert "| layer | λ (95 % CI) |" in lam and "Mean λ over layers and heads" in lam
    assert "Skipped" not in lam and "prefix key distance (median)" in text


@pytest.mark.slow  # whole fits
def test_evaluate_script_scores_the_bare_backbone(fitted_run, capsys):
    import sys
    from pathlib import Path

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "scripts"))
    import evaluate as evaluate_script

    assert evaluate_script.main([str(fitted_run.run_dir), "--no-prefix"]) == 0
    out = capsys.readouterr().out
    assert "val/bleu:" in out and "val/rougeL:" in out and "eval-val-noprefix.json" in out


@pytest.mark.slow  # whole fits
def test_resumed_run_ends_with_the_weights_of_an_uninterrupted_one(tiny_lm_dir, descriptions, tmp_path, monkeypatch):
    from safetensors.torch import load_file

    steps_run = []
    original = GenerationModule.training_step

    def counted(self, batch, batch_idx):
        steps_run.append(self.global_step)
        return original(self, batch, batch_idx)

    monkeypatch.setattr(GenerationModule, "training_step", counted)

    def run(run_dir, steps, resume=False):
        steps_run.clear()
        extra = {"optim.schedule": "constant", "trainer.max_steps": steps, "checkpoint_every_n_steps": 2}
        cfg = load_config(None, overrides(tiny_lm_dir, descriptions, run_dir, **extra))
        return load_file(str(fit(cfg, resume=resume).run_dir / "adapter.safetensors"))

    straight = run(tmp_path / "straight", 7)
    run(tmp_path / "resumed", 3)  # stops mid-epoch (5 batches per epoch), like a killed run
    resumed = run(tmp_path / "resumed", 7, resume=True)
    # Its last checkpoint holds step 2 (one every 2 steps): the resumed run redoes step 2, nothing before.
    assert steps_run == [2, 3, 4, 5, 6]
    assert straight.keys() == resumed.keys()
    assert all(torch.equal(straight[k], resumed[k]) for k in straight)


def test_generation_benchmark_times_both_ways_of_each_part(tiny_lm_dir, descriptions, tmp_path):
    from moe_prefix.tools.bench_generation import PAIRS, format_gem4, run_gem4

    results = run_gem4(None, overrides(tiny_lm_dir, descriptions, tmp_path), steps=2, val_inputs=6, reps=2, val_reps=1)
    arms = results["arms"]
    assert set(arms) == {name for pair in PAIRS.values() for name in pair}
    assert all(f["s"] > 0 for f in arms.values()) and all(r > 0 for r in results["ratios"].values())
    # longest first pads less (never more) than split order, over the same examples
    for part in ("loss_pass", "decoding"):
        assert arms[f"{part}_longest_first"]["padded_tokens"] <= arms[f"{part}_split_order"]["padded_tokens"]
    assert "step: scored logits / every position" in format_gem4(results)
