"""Tiny backbones built from configs: no network, seconds to build. Every session checks that it left the
source tree unchanged (tree_check.py)."""

import contextlib
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402
from transformers import (  # noqa: E402
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)
from tree_check import source_tree_unchanged  # noqa: E402, F401  (an autouse session fixture)

# Tiny models are dominated by thread start-up; one thread is faster, and robust on a busy machine.
torch.set_num_threads(1)


# A pinned release the package index no longer serves (bigbench 1.0.0, withdrawn by 2026-12-04) cannot be
# fetched by anyone: the tests that read it are skipped with the index's answer as the reason, unless a cache
# prefetched while it was served holds the files. Any other fetch failure (sha256 mismatch, no network) still
# fails the test.
@contextlib.contextmanager
def _skipped_if_withdrawn():
    from moe_prefix.train.assets import AssetUnavailable

    try:
        yield
    except AssetUnavailable as err:
        pytest.skip(str(err))


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item):
    with _skipped_if_withdrawn():
        return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_fixture_setup(fixturedef, request):  # fixtures that fetch a real asset
    with _skipped_if_withdrawn():
        return (yield)


VOCAB = 97


def tiny_bert(**overrides) -> BertForSequenceClassification:
    """overrides: BertConfig fields that differ from the tiny defaults (vocab_size, num_labels, ...)."""
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        max_position_embeddings=64,
        num_labels=2,
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    return BertForSequenceClassification(BertConfig(**(fields | overrides))).eval()


def tiny_gpt2(**overrides) -> GPT2LMHeadModel:
    """overrides: GPT2Config fields that differ from the tiny defaults."""
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB,
        n_embd=32,
        n_layer=2,
        n_head=4,
        n_positions=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
    )
    return GPT2LMHeadModel(GPT2Config(**(fields | overrides))).eval()


def tiny_llama(**overrides) -> LlamaForCausalLM:
    """Grouped-query attention: 4 query heads share 2 key/value heads. overrides: LlamaConfig fields."""
    torch.manual_seed(0)
    fields = dict(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    return LlamaForCausalLM(LlamaConfig(**(fields | overrides))).eval()


FAMILIES = {"bert": tiny_bert, "gpt2": tiny_gpt2, "llama": tiny_llama}


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


def batch(b: int = 3, t: int = 9, seed: int = 0, pad_side: str = "right"):
    """Random ids with a different amount of padding per row."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (b, t), generator=g)
    mask = torch.ones(b, t, dtype=torch.long)
    for i in range(1, b):
        n = min(2 * i, t - 2)
        if pad_side == "right":
            mask[i, t - n :] = 0
        else:
            mask[i, :n] = 0
    ids = ids.masked_fill(mask == 0, 0)
    return ids, mask


def real_diff(a, b, mask):
    """Largest |a - b| over real (unpadded) positions."""
    return (a - b)[mask.bool()].abs().max().item()


def fixed_routing_against_peft(mixture, blend: list[float], prefix_positions: int, tmp_path):
    """A mixture on `tiny_llama()` with its group router set to give group 0 exactly `blend`, exported as a PEFT
    prefix adapter of that fixed routing: (mixture logits, PEFT's logits, mask, the adapter's folder) on one
    left-padded batch."""
    import peft

    from moe_prefix.peft_interop import export_peft_adapter, peft_position_ids

    with torch.no_grad():
        mixture.router.proj.weight.copy_(torch.tensor(blend).log()[:, None])
    ids, mask = batch(pad_side="left")
    folder = export_peft_adapter(mixture, tmp_path, routing=blend)
    groups = torch.zeros(ids.shape[0], dtype=torch.long)
    positions = peft_position_ids(ids, prefix_positions)
    with torch.no_grad():
        got = mixture(input_ids=ids, attention_mask=mask, group_ids=groups, position_ids=positions).logits
        expected = peft.PeftModel.from_pretrained(tiny_llama(), folder).eval()(input_ids=ids, attention_mask=mask)
    return got, expected.logits, mask, folder


WORDS = [
    "good",
    "great",
    "fine",
    "bad",
    "awful",
    "poor",
    "movie",
    "food",
    "screen",
    "plot",
    "taste",
    "battery",
]


@pytest.fixture(scope="session")
def tiny_backbone_dir(tmp_path_factory):
    """A tiny BERT and a word-level tokenizer saved like a pretrained model folder."""
    folder = tmp_path_factory.mktemp("tiny_bert")
    return save_tiny_backbone(folder)


def save_tiny_backbone(folder):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="[UNK]"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    core.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)]
    )
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
    )
    tokenizer.save_pretrained(folder)
    # BERT's default dropout, as in a real pretrained folder: runs on it train with dropout on.
    body = tiny_bert(vocab_size=len(vocab), hidden_dropout_prob=0.1, attention_probs_dropout_prob=0.1).bert
    body.save_pretrained(folder)
    return folder


def write_reviews_csv(path, n=160, seed=0):
    """Reviews whose label follows their sentiment word, in two 'sites' with different topic words."""
    import csv
    import random

    rng = random.Random(seed)
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["review", "stars", "site"])
        for _ in range(n):
            site = rng.choice(["cinema", "kitchen"])
            topics = ["movie", "plot", "screen"] if site == "cinema" else ["food", "taste", "battery"]
            positive = rng.random() < 0.5
            sentiment = rng.choice(["good", "great", "fine"] if positive else ["bad", "awful", "poor"])
            words = [rng.choice(topics) for _ in range(rng.randint(2, 6))] + [sentiment]
            rng.shuffle(words)
            writer.writerow([" ".join(words), "pos" if positive else "neg", site])
    return path


@pytest.fixture
def reviews_csv(tmp_path):
    return write_reviews_csv(tmp_path / "reviews.csv")


def tiny_run_overrides(backbone_dir, csv_path, run_dir, **extra):
    """Config overrides for a seconds-long run on the tiny backbone and a generated CSV."""
    values = {
        "model.backbone": backbone_dir,
        "data.source": csv_path,
        "data.text_column": "review",
        "data.label_column": "stars",
        "data.group_column": "site",
        "data.batch_size": 16,
        "prefix.num_experts": 2,
        "prefix.prefix_len": 4,
        "prefix.top_k": 1,
        "trainer.max_steps": 8,
        "trainer.max_epochs": 50,
        "trainer.enable_progress_bar": False,
        "trainer.enable_model_summary": False,
        "trainer.log_every_n_steps": 1,  # runs shorter than Lightning's default interval of 20 steps
        "trainer.logger": None,
        "run_dir": run_dir,
        "checkpoint_every_n_steps": 4,
        "optim.lr": 0.05,
    }
    values.pop("trainer.logger")
    values.update(extra)
    return [f"{k}={v}" for k, v in values.items()]


def poison_loss_from_step(monkeypatch, step: int) -> None:
    """Make classification training losses NaN from the given step on (validation stays finite)."""
    from moe_prefix.train.classification import ClassificationModule

    original = ClassificationModule.model_step

    def poisoned(self, batch):
        losses, out = original(self, batch)
        return (losses * float("nan") if self.training and self.global_step >= step else losses), out

    monkeypatch.setattr(ClassificationModule, "model_step", poisoned)


# A tiny causal LM over a word-level vocabulary of E2E-like descriptions (generation and RL tests).
NAMES = ["alpha", "bravo", "cosmo", "delta", "echo", "foxtrot", "golf", "hotel"]
FOODS = ["pasta", "sushi", "curry"]
AREAS = ["north", "south"]
LM_WORDS = ["name", "food", "area", ":", ",", "serves", "in", "the", "a", "place", "is", ".", "located"]
LM_SPECIALS = ["<pad>", "<unk>", "<s>", "</s>"]
EOS = 3


def save_word_tokenizer(folder) -> list[str]:
    """The word-level tokenizer of the tiny generation backbones, saved to `folder`; returns its vocabulary."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = LM_SPECIALS + LM_WORDS + NAMES + FOODS + AREAS
    core = Tokenizer(models.WordLevel({w: i for i, w in enumerate(vocab)}, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    tokenizer.save_pretrained(folder)
    return vocab


def save_tiny_causal_lm(folder):
    """A tiny Llama (grouped-query attention) and a word-level tokenizer, saved like a pretrained folder."""
    vocab = save_word_tokenizer(folder)
    torch.manual_seed(0)
    cfg = LlamaConfig(
        vocab_size=len(vocab),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        intermediate_size=64,
        max_position_embeddings=128,
        bos_token_id=2,
        eos_token_id=EOS,
        pad_token_id=0,
    )
    LlamaForCausalLM(cfg).save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def tiny_lm_dir(tmp_path_factory):
    return save_tiny_causal_lm(tmp_path_factory.mktemp("tiny_llama"))
