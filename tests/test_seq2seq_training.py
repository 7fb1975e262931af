"""model.task=generation on an encoder-decoder backbone: a tiny random BART saved to a folder with a word-level
tokenizer (no network), its batches, loss and decoding, and fit -> evaluate -> analyze end to end."""

import json
import re

import pytest
import torch
from conftest import EOS, save_word_tokenizer
from test_generation import overrides, write_descriptions_jsonl
from transformers import BartConfig, BartForConditionalGeneration

from moe_prefix.injection import SEQ2SEQ_MIN_TRANSFORMERS, STATE_KWARG, seq2seq_supported
from moe_prefix.train.engine import evaluate_run, fit
from moe_prefix.train.generation import GenerationModule, build
from moe_prefix.train.run_config import load_config

pytestmark = pytest.mark.skipif(
    not seq2seq_supported(), reason=f"encoder-decoder prefixes need transformers >= {SEQ2SEQ_MIN_TRANSFORMERS}"
)


torch.set_num_threads(1)
START = 2  # <s>: the decoder's first input


def save_tiny_bart(folder):
    """A tiny random BART and the word-level tokenizer of the decoder tests, saved like a pretrained folder."""
    vocab = save_word_tokenizer(folder)
    torch.manual_seed(0)
    cfg = BartConfig(
        vocab_size=len(vocab),
        d_model=32,
        encoder_layers=2,
        decoder_layers=2,
        encoder_attention_heads=4,
        decoder_attention_heads=4,
        encoder_ffn_dim=64,
        decoder_ffn_dim=64,
        max_position_embeddings=64,
        pad_token_id=0,
        bos_token_id=START,
        eos_token_id=EOS,
        decoder_start_token_id=START,
        forced_bos_token_id=None,
        forced_eos_token_id=None,
        init_std=0.2,
    )
    BartForConditionalGeneration(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def bart_dir(tmp_path_factory):
    return save_tiny_bart(tmp_path_factory.mktemp("tiny_bart"))


@pytest.fixture(scope="module")
def descriptions(tmp_path_factory):
    return write_descriptions_jsonl(tmp_path_factory.mktemp("data") / "descriptions.jsonl")


@pytest.fixture(scope="module")
def built(bart_dir, descriptions, tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("unused")
    cfg = load_config(None, overrides(bart_dir, descriptions, run_dir, **{"prefix.router_init": "kmeans"}))
    tokenizer, data, network = build(cfg)
    # a nearest-centroid router over the prompts' clusters: inputs of one batch pick different banks
    network.mixture.init_router_kmeans(data.generation_loader(data.val_prompts, data.val_examples))
    network.eval()
    return cfg, tokenizer, data, network


def test_batches_put_the_prompt_in_the_encoder_and_target_plus_eos_in_the_labels(built):
    cfg, tokenizer, data, network = built
    assert network.seq2seq and network.mixture.rows[0] == ("encoder", 0) and len(network.mixture.rows) == 6
    items = data.train_set[:5]
    batch = data.collate(items)
    for i, item in enumerate(items):
        record = data.train_examples[item.index]
        prompt = tokenizer(cfg.data.prompt_format.format(input=record["input"]))["input_ids"]
        n = len(prompt)
        assert batch["input_ids"][i, :n].tolist() == prompt and batch["attention_mask"][i].sum() == n
        assert batch["input_ids"][i, n:].eq(tokenizer.pad_token_id).all()  # right padding
        labels = batch["labels"][i][batch["labels"][i] != -100].tolist()
        assert labels[-1] == EOS and tokenizer.decode(labels[:-1]) in record["targets"]
        assert batch["labels"][i, len(labels) :].eq(-100).all()
        assert torch.equal(batch["router_input_ids"], batch["input_ids"])


def test_loss_is_the_backbones_own_loss_of_each_example_alone(built):
    cfg, tokenizer, data, network = built
    module = GenerationModule(network, cfg, tokenizer)
    batch = data.collate(data.train_set[:6])
    with torch.no_grad():
        losses, scored, _ = module.forward_pairs(batch)
        per_example = (losses * scored).sum(-1) / scored.sum(-1)
        for i in range(6):
            n, m = int(batch["attention_mask"][i].sum()), int((batch["labels"][i] != -100).sum())
            ids, labels = batch["input_ids"][i : i + 1, :n], batch["labels"][i : i + 1, :m]
            _, state = network.mixture.prepare(ids, torch.ones_like(ids))
            alone = network.mixture.backbone(input_ids=ids, labels=labels, **{STATE_KWARG: state}).loss
            assert per_example[i].item() == pytest.approx(alone.item(), abs=1e-5)


def test_decoding_equals_stepwise_greedy_of_each_example_alone(built):
    cfg, tokenizer, data, network = built
    module = GenerationModule(network, cfg, tokenizer)
    batch = next(iter(data.generation_loader(data.val_prompts, data.val_examples)))
    assert batch["attention_mask"][:, -1].eq(0).any(), "the batch should be right-padded"
    tokens = module.generate_tokens(batch["input_ids"], batch["attention_mask"])
    assert len({tuple(r) for r in network.mixture.last_routing.indices.tolist()}) > 1
    assert any(tokens), "nothing was generated"
    for i, item in enumerate(data.val_prompts[: len(tokens)]):
        ids = torch.tensor([item.input_ids])
        with torch.no_grad():
            _, state = network.mixture.prepare(ids, torch.ones_like(ids))
            seq, new = torch.tensor([[START]]), []
            for _ in range(cfg.generation.max_new_tokens):
                logits = network.mixture.backbone(
                    input_ids=ids, decoder_input_ids=seq, use_cache=False, **{STATE_KWARG: state}
                ).logits
                token = int(logits[0, -1].argmax())
                if token == EOS:
                    break
                new.append(token)
                seq = torch.cat([seq, torch.tensor([[token]])], 1)
        assert tokens[i] == new


@pytest.mark.slow  # a whole fit, evaluation and analysis
def test_fit_evaluate_analyze_on_a_saved_bart(bart_dir, descriptions, tmp_path):
    from moe_prefix.tools.analyze import analyze_run

    run = fit(load_config(None, overrides(bart_dir, descriptions, tmp_path / "run"))).run_dir
    metrics = json.loads((run / "metrics.json").read_text())
    assert {"val/bleu", "val/rougeL", "val/loss", "val/router_entropy"} <= set(metrics)
    assert metrics["steps"] == 6
    samples = [json.loads(line) for line in (run / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 4 and all(set(s) == {"id", "prediction", "references"} for s in samples)
    header = (run / "routing.csv").read_text().splitlines()[0].split(",")
    assert header[0] == "id" and {"loss", "new_tokens", "bleu", "prefix_len", "experts", "w0", "w2"} <= set(header)
    again = evaluate_run(run).metrics
    assert again["val/loss"] == pytest.approx(metrics["val/loss"], rel=1e-5)
    assert again["val/bleu"] == pytest.approx(metrics["val/bleu"])
    bare = evaluate_run(run, no_prefix=True).metrics
    assert "val/router_entropy" not in bare and bare["val/loss"] != pytest.approx(metrics["val/loss"])
    report = analyze_run(run, progress=False)
    text = report.read_text()
    assert "routing" in text.lower()
    lam = text[text.index("## Prefix attention mass λ") : text.index("## Prefix lengths")]
    assert "Skipped" not in lam and "decoder self- and cross-attention over the reference's" in lam
    # one row per site with its interval, then one per (site, layer)
    for site in ("encoder self-attention", "decoder self-attention", "cross-attention"):
        assert re.search(rf"\| {site} \| 2 \| 0\.\d{{3}} \(0\.\d{{3}} to 0\.\d{{3}}\) \|", lam), site
    for site in ("encoder", "decoder", "cross"):
        for layer in (0, 1):
            assert re.search(rf"\| {site} \| {layer} \| 0\.\d{{3}} \(", lam), (site, layer)
    assert "| cross 1 |" in text  # the bank geometry, per row
