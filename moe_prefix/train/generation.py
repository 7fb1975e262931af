"""Generation: a frozen causal or encoder-decoder LM learns to write a text for an input through the routed prefix.

The task is E2E NLG style data-to-text (Li & Liang 2021 evaluate prefix tuning on it): a meaning
representation goes in, a restaurant description comes out, and every input has several references.

- Data: one training pair per (input, reference); the split is by input, so no input has references
  on both sides. A pair's tokens are prompt + target + eos; the loss covers target and eos only
  (labels -100 on the prompt and on padding). The router sees the prompt alone, so what it picks
  at training time is what it can pick at generation time, when no target exists yet.
- Encoder-decoder backbones (BART, T5; `config.is_encoder_decoder`): the prompt is the encoder's input and the
  target + eos the decoder's labels (the model shifts them into decoder inputs itself); the loss covers the
  same tokens, and the prefix sits on the sites `prefix.sites` names, routed from the prompt.
- Validation: the loss on every reference, then each input is decoded once with `generate()` (greedy
  or beam search, per `cfg.generation`) through the prefix routed from its prompt, and scored against
  all its references: corpus BLEU (SacreBLEU, 13a tokenisation) and ROUGE-L F-measure (best reference
  per input), both on a 0-100 scale; where every input is an E2E meaning representation, also the slot
  error rate `val/ser` (percent of the inputs' slots missed or stated wrongly; `e2e_slots`).
- Objectives (`optim.objective`): `sft` trains the references' cross-entropy; `rft` and `prefix_rft` sample
  texts from the routed prefix and train on their rewards (GRPO, Prefix-RFT; `rft`).
- A task of the run loop (see `module.Task`): `engine.fit` writes the run directory classification
  writes, plus `samples.jsonl`; `engine.evaluate_run(run_dir, no_prefix=True)` scores the bare backbone
  on the same split and prompts: the zero-shot reference a prefix has to beat.

Axes: b - batch, t - tokens, v - vocabulary, e - experts.
"""

from __future__ import annotations

import collections
import dataclasses
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

from moe_prefix.injection import enable_activation_checkpointing

from . import assets, e2e_slots, few_shot, rft, text_scores
from . import data as data_io
from . import run_dir as rd
from .datamodule import Encoded, TrainData, load_tokenizer, pad_batch, read_train_val, subsample
from .module import Built, PrefixTrainingModule, routing_metrics, routing_row
from .networks import CausalLM, TaskOutput
from .run_config import ConfigError, RunConfig

INIT_SEQUENCES = 32
EVALUATES_OTHER_FILES = False  # evaluation scores the run's own validation split
HAS_ZERO_SHOT = True  # the bare backbone can be scored on the same prompts (evaluate --no-prefix)
# per-example scores in routing.csv (empty where undefined), which the ablation runner pairs across runs
EXAMPLE_SCORES = ("bleu", "rougeL", "ser", "slots", "coverage")


# -- scores -------------------------------------------------------------------------------------------


def generation_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU and mean ROUGE-L F-measure, 0-100, against every input's references.

    BLEU is SacreBLEU's (13a tokenisation, n-gram counts clipped by the most generous reference, brevity
    penalty from the closest reference length; `text_scores`). ROUGE-L scores each input by its best
    reference (highest LCS F-measure) and averages over inputs. Neither needs NLTK data.
    """
    if not predictions:
        return {"bleu": float("nan"), "rougeL": float("nan")}
    stats = [text_scores.bleu_stats(p, refs) for p, refs in zip(predictions, references, strict=True)]
    rouge = text_scores.rouge_l(predictions, references)
    return {"bleu": text_scores.corpus_bleu(stats), "rougeL": sum(rouge) / len(rouge)}


def score_rows(rows: list[dict]) -> None:
    """Add each decoded row's own scores: `bleu` (sentence BLEU, SacreBLEU's exp smoothing), `rougeL`, and
    where defined `ser` with `slots` (E2E inputs) and `coverage` (CommonGen concept sets); `_bleu_stats`
    keeps the statistics corpus BLEU adds up."""
    rouge = text_scores.rouge_l([r["prediction"] for r in rows], [r["references"] for r in rows])
    e2e = [r for r in rows if r.get("source") in (None, "e2e_nlg")]
    e2e_style = any(r.get("source") == "e2e_nlg" for r in rows) or e2e_slots.all_parse([r["input"] for r in e2e])
    for row, rouge_l in zip(rows, rouge, strict=True):
        stats = text_scores.bleu_stats(row["prediction"], row["references"])
        row.update(_bleu_stats=stats, bleu=stats.score(effective_order=True), rougeL=rouge_l)
        if e2e_style and row.get("source") in (None, "e2e_nlg"):
            check = e2e_slots.check_slots(row["prediction"], row["input"])
            row.update(ser=100 * check.ser, slots=check.slots)
        if row.get("source") == "common_gen":
            concepts = text_scores.parse_concepts(row["input"])
            row["coverage"] = 100 * text_scores.concept_coverage(row["prediction"], concepts)


def corpus_metrics(rows: list[dict]) -> dict[str, float]:
    """val/bleu, val/rougeL (and val/ser, val/coverage where defined) over all scored rows; with several
    sources also per source (val/bleu/webnlg_en, ...) and their unweighted means (val/bleu_macro, ...)."""

    def over(part: list[dict], suffix: str = "") -> dict[str, float]:
        out = {
            f"val/bleu{suffix}": text_scores.corpus_bleu([r["_bleu_stats"] for r in part]),
            f"val/rougeL{suffix}": sum(r["rougeL"] for r in part) / len(part),
        }
        slotted = [r for r in part if "ser" in r]
        if slotted:  # corpus SER: all errors over all slots (Dušek et al. 2019), not a mean of ratios
            errors = sum(r["ser"] * r["slots"] for r in slotted)
            out[f"val/ser{suffix}"] = errors / max(sum(r["slots"] for r in slotted), 1)
        covered = [r for r in part if "coverage" in r]
        if covered:
            out[f"val/coverage{suffix}"] = sum(r["coverage"] for r in covered) / len(covered)
        return out

    metrics = over(rows)
    sources = sorted({r["source"] for r in rows if r.get("source")})
    if len(sources) > 1:
        per = [over([r for r in rows if r.get("source") == name], f"/{name}") for name in sources]
        for part in per:
            metrics |= part
        for key in ("bleu", "rougeL"):
            metrics[f"val/{key}_macro"] = sum(p[f"val/{key}/{n}"] for p, n in zip(per, sources, strict=True)) / len(per)
    return metrics


# -- data ---------------------------------------------------------------------------------------------


def subsample_sources(records: list[dict], n: int | None, seed: int) -> list[dict]:
    """A seeded subsample of n records; records with a source (`group`) give n / sources each (the remainder to
    the first sources, and what a small source cannot give to the others), so the mix stays balanced."""
    groups = list(dict.fromkeys(r.get("group") for r in records))
    if n is None or n >= len(records) or groups == [None]:
        return subsample(records, n, seed)
    sizes = {g: sum(r.get("group") == g for r in records) for g in groups}
    quota = dict.fromkeys(groups, 0)
    left = n
    while left:  # one record at a time, smallest quota first, never beyond a source's size
        open_groups = [g for g in groups if quota[g] < sizes[g]]
        quota[min(open_groups, key=lambda g: quota[g])] += 1
        left -= 1
    kept = {id(r) for g in groups for r in subsample([r for r in records if r.get("group") == g], quota[g], seed)}
    return [r for r in records if id(r) in kept]


class GenerationData(TrainData):
    """Prompt/target pairs for training, pairs and prompts for validation.

    Training batches are right-padded and carry `labels` (-100 on prompt and padding) and
    `router_input_ids` / `router_attention_mask` (the prompt alone). Generation batches are
    left-padded prompts, so every row's new tokens start in the same column.
    seq2seq: pairs are split into the prompt (input_ids, the encoder's) and target + eos (labels, the decoder's).
    """

    def __init__(self, cfg: RunConfig, tokenizer, seq2seq: bool = False):
        super().__init__(cfg, tokenizer)
        self.seq2seq = seq2seq

    def load(self) -> None:
        """Read, split by input and tokenise once; safe to call again."""
        if self.loaded:
            return
        d = self.cfg.data

        def read(source: str, split: str | None) -> list[dict]:
            columns = (d.text_column, d.label_column)
            return data_io.load_generation_records(source, *columns, split=split, drop_empty_texts=d.drop_empty_texts)

        train, val = read_train_val(d, read, data_io.split_by_input)
        # A seeded split is by input; separate sources or splits must not share one either.
        shared = {r["input"] for r in train} & {r["input"] for r in val}
        if shared:
            where = "data.val_source" if d.val_source else f"the split {d.val_split!r} of data.source"
            raise data_io.DataError(
                f"{len(shared)} input(s) of {where} also occur in the training data, e.g. {min(shared)!r}; "
                "remove them from one side"
            )
        # max_*_examples count inputs, so a subsample keeps every reference of what it keeps
        self.train_examples = subsample_sources(train, d.max_train_examples, d.split_seed)
        self.val_examples = subsample_sources(val, d.max_val_examples, d.split_seed)
        # Groups (the GEM sources): per-source metrics and oracle routing; sorted, as classification sorts them
        self.group_names = sorted({r["group"] for r in train + val if r.get("group")})
        self.group_vocab = {g: i for i, g in enumerate(self.group_names)}
        # Targets of one line: decoding ends at the first line break, for every model alike.
        self.single_line = not any("\n" in t for r in self.train_examples for t in r["targets"])
        self.train_set = self.encode_pairs(self.train_examples)
        val_prompts = None
        if d.few_shot:  # a run that trains nothing (checked): its validation prompts carry demonstrations
            val_prompts, kept = few_shot.few_shot_prompts(
                self.val_examples, self.train_examples, self.cfg, self.tokenizer
            )
            self.val_examples = [r | {"demonstrations": j} for r, j in zip(self.val_examples, kept, strict=True)]
        self.val_pairs = self.encode_pairs(self.val_examples, val_prompts)
        self.val_prompts = self.encode_prompts(self.val_examples, val_prompts)
        self.loaded = True

    # -- tokens -------------------------------------------------------------------------------------
    def _prompt_ids(self, records) -> list[list[int]]:
        # a built-in GEM source brings its own prompt (BIG-bench's), which prompt_format wraps like an input
        prompts = [self.cfg.data.prompt_format.format(input=r.get("prompt", r["input"])) for r in records]
        return self.tokenizer(prompts)["input_ids"]

    def encode_pairs(self, records, prompts: list[list[int]] | None = None) -> list[Encoded]:
        """One example per (input, reference): prompt + target + eos; `router_len` marks the prompt.
        prompts: the records' prompt ids when not their own prompts alone (few-shot)."""
        max_len = self.cfg.model.max_length
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the backbone's tokenizer has no eos token; generation needs one to stop")
        prompts = self._prompt_ids(records) if prompts is None else prompts
        flat = [(i, t) for i, r in enumerate(records) for t in r["targets"]]
        targets = self.tokenizer([t for _, t in flat], add_special_tokens=False)["input_ids"] if flat else []
        items, truncated = [], 0
        for (i, _), target in zip(flat, targets, strict=True):
            prompt = prompts[i][: max_len - 1]  # at least one target token survives
            ids = prompt + target + [eos]
            truncated += len(ids) > max_len or len(prompts[i]) > len(prompt)
            group = self.group_vocab.get(records[i].get("group"), -1)
            items.append(Encoded(index=i, input_ids=ids[:max_len], group=group, router_len=len(prompt)))
        if truncated:
            warnings.warn(
                f"{truncated} of {len(items)} prompt+target sequences are longer than "
                f"model.max_length={max_len} tokens and were truncated",
                stacklevel=2,
            )
        return items

    def encode_prompts(self, records, prompts: list[list[int]] | None = None) -> list[Encoded]:
        """One example per input: the prompt alone, cut as the training pairs cut it (prompts: as encode_pairs)."""
        max_len = self.cfg.model.max_length
        prompts = self._prompt_ids(records) if prompts is None else prompts
        return [
            Encoded(
                index=i,
                input_ids=ids[: max_len - 1],
                group=self.group_vocab.get(r.get("group"), -1),
                router_len=len(ids[: max_len - 1]),
            )
            for i, (r, ids) in enumerate(zip(records, prompts, strict=True))
        ]

    # -- batches ------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded pairs: (b t) input_ids, attention_mask, labels; (b t') router_*."""
        if self.seq2seq:
            return self._collate_seq2seq(items)
        batch = pad_batch(items, self.pad_id)
        # From the mask, not the ids: the pad token may be the eos token, whose label must stay.
        labels = batch["input_ids"].masked_fill(batch["attention_mask"] == 0, -100)
        for i, x in enumerate(items):
            labels[i, : x.router_len] = -100
        prompts = pad_batch([Encoded(x.index, x.input_ids[: x.router_len]) for x in items], self.pad_id)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "labels": labels,
            "router_input_ids": prompts["input_ids"],
            "router_attention_mask": prompts["attention_mask"],
            "group_ids": batch["group_ids"],
            "has_group": batch["has_group"],
            "index": batch["index"],
        }

    def _collate_seq2seq(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded prompts (b t) for the encoder, the router reading the same; labels (b t') target + eos."""
        prompts = pad_batch([dataclasses.replace(x, input_ids=x.input_ids[: x.router_len]) for x in items], self.pad_id)
        targets = pad_batch([Encoded(x.index, x.input_ids[x.router_len :]) for x in items], self.pad_id)
        labels = targets["input_ids"].masked_fill(targets["attention_mask"] == 0, -100)
        return {
            "input_ids": prompts["input_ids"],
            "attention_mask": prompts["attention_mask"],
            "labels": labels,
            "router_input_ids": prompts["input_ids"],
            "router_attention_mask": prompts["attention_mask"],
            "group_ids": prompts["group_ids"],
            "has_group": prompts["has_group"],
            "index": prompts["index"],
        }

    def collate_prompts(self, items: list[Encoded], records) -> dict:
        """Left-padded prompts (b t), with their ids and references (lists of strings); right-padded for an
        encoder-decoder model, as in training (its decoder starts every row in the same column anyway)."""
        batch = pad_batch(items, self.pad_id, left=not self.seq2seq)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "group_ids": batch["group_ids"],
            "has_group": batch["has_group"],
            "index": batch["index"],
            "ids": [records[x.index]["id"] for x in items],
            "sources": [records[x.index].get("group") for x in items],
            "inputs": [records[x.index]["input"] for x in items],
            "references": [records[x.index]["targets"] for x in items],
            "demonstrations": [records[x.index].get("demonstrations") for x in items],  # few-shot: how many kept
        }

    def router_view(self, batch: dict) -> dict:
        return {"input_ids": batch["router_input_ids"], "attention_mask": batch["router_attention_mask"]}

    def generation_loader(self, prompts: list[Encoded], records):
        return self.eval_loader(prompts, collate=lambda items: self.collate_prompts(items, records))

    def val_dataloader(self):
        """Two loaders: dataloader_idx 0 holds the reference pairs (loss), 1 the prompts (decoding).

        Both go longest first: a batch pads to its longest sequence, and gem4's sources differ in length 5-fold
        (CommonGen's prompts ~22 tokens, dialogue ones up to 198), so batches of like length pad little. An
        example's loss and greedy decoding do not depend on its batch; the module puts rows back in split order.
        """
        pairs, prompts = longest_first(self.val_pairs), longest_first(self.val_prompts)
        return [self.eval_loader(pairs), self.generation_loader(prompts, self.val_examples)]


def longest_first(items: list[Encoded]) -> list[Encoded]:
    """Encoded examples by length, longest first (a stable sort: ties keep split order)."""
    return sorted(items, key=lambda x: -len(x.input_ids))


# -- the Lightning module ---------------------------------------------------------------------------


class GenerationModule(PrefixTrainingModule):
    """A causal LM with any method; validates by the references' loss and by decoding."""

    def __init__(self, network: CausalLM, cfg: RunConfig, tokenizer, single_line: bool = True, train_records=()):
        super().__init__(network, cfg)  # self.rows: one per decoded input
        self.tokenizer = tokenizer
        self.single_line = single_line  # cut predictions at the first line break
        self.input_losses: dict[int, list[float]] = {}  # input index -> loss of each reference
        self.train_records = list(train_records)  # rft / prefix_rft: inputs and references, by training index
        self.rollouts: collections.deque[list[dict]] = collections.deque(maxlen=cfg.rl.rollouts_saved)
        self._stop_ids: list[int] | None = None
        self.oracle = cfg.prefix.router_input == "group"  # routed by the source: the batch's group_ids

    def forward_pairs(self, batch):
        """Losses (b t-1) and scored-token mask of a pair batch (encoder-decoder: (b t') over the decoder's
        labels), and the network output (decoder-only: logits at the scored positions only, (n vocab))."""
        labels = batch["labels"]
        routed = {
            "router_input_ids": batch["router_input_ids"],
            "router_attention_mask": batch["router_attention_mask"],
            "group_ids": batch["group_ids"] if self.oracle else None,
        }
        if self.network.seq2seq:
            # the backbone makes its decoder inputs from the labels (shifted right after a start token)
            out = self.network(batch["input_ids"], batch["attention_mask"], labels=labels, **routed)
            losses = F.cross_entropy(out.logits.float().transpose(1, 2), labels, ignore_index=-100, reduction="none")
            return losses, labels != -100, out
        scored = labels[:, 1:] != -100  # the logits at t predict the token at t + 1
        out = self.network(batch["input_ids"], batch["attention_mask"], logits_at=F.pad(scored, (0, 1)), **routed)
        losses = torch.zeros(scored.shape, device=labels.device)
        losses[scored] = F.cross_entropy(out.logits.float(), labels[:, 1:][scored], reduction="none")
        return losses, scored, out

    def model_step(self, batch):
        """The loss of every target token of the batch (their mean is the training loss); rft and prefix_rft:
        the batch's policy-gradient loss (one value)."""
        if self.cfg.optim.objective != "sft":
            return self.rl_step(batch)
        losses, scored, out = self.forward_pairs(batch)
        return losses[scored], out

    # -- reinforcement fine-tuning ------------------------------------------------------------------
    @property
    def total_steps(self) -> int:
        trainer = self._trainer
        return max(int(trainer.estimated_stepping_batches), 1) if trainer is not None else 1

    def rl_step(self, batch):
        """GRPO / Prefix-RFT on a batch of (input, reference) pairs (`rft.rl_step`); logs the rollouts' rewards
        and keeps them for rollouts.jsonl. Returns the loss (1) and the network output (with the routing)."""
        if self._stop_ids is None:
            self._stop_ids = rft.stop_tokens(self.tokenizer, self.single_line)
        records = [self.train_records[i] for i in batch["index"].tolist()]
        step = rft.rl_step(
            self.network,
            batch,
            records,
            self.cfg,
            (self.global_step, self.total_steps),
            self.tokenizer,
            self.decode,
            self._stop_ids,
        )
        self.log_dict(step.logs, batch_size=len(records))
        if self.rollouts.maxlen:
            self.rollouts.append([{"step": self.global_step} | row for row in step.rows])
        loss = step.loss
        if self.cfg.rl.sft_weight:  # the anchor: SFT's loss on the batch's references keeps the policy near them
            losses, scored, _ = self.forward_pairs(batch)
            sft_loss = losses[scored].mean()
            self.log("train/sft_loss", sft_loss, batch_size=len(records))
            loss = loss + self.cfg.rl.sft_weight * sft_loss
        return loss[None], TaskOutput(step.logits, step.routing)

    # -- decoding -----------------------------------------------------------------------------------
    def generate_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, group_ids=None) -> list[list[int]]:
        """New tokens per left-padded prompt (b t), up to and excluding eos; group_ids (b): oracle routing."""
        g = self.cfg.generation
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        out = self.network.generate(
            input_ids,
            attention_mask,
            group_ids=group_ids if self.oracle else None,
            max_new_tokens=g.max_new_tokens,
            num_beams=g.num_beams,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        # a decoder-only model returns prompt + new tokens; an encoder-decoder one, the decoder start + new tokens
        new = out[:, 1 if self.network.seq2seq else input_ids.shape[1] :].tolist()
        return [row[: row.index(eos)] if eos in row else row for row in new]

    def decode(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return text.split("\n")[0].strip() if self.single_line else text

    # -- validation ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self):
        super().on_validation_epoch_start()
        self.input_losses = {}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if dataloader_idx == 0:
            losses, scored, _ = self.forward_pairs(batch)
            counts = scored.sum(-1)
            per_pair = (losses * scored).sum(-1) / counts.clamp_min(1)
            self.val_loss.update(per_pair, weight=counts)  # a token-level mean, like train/loss
            for i, loss in zip(batch["index"].tolist(), per_pair.tolist(), strict=True):
                self.input_losses.setdefault(i, []).append(loss)
            return
        tokens = self.generate_tokens(batch["input_ids"], batch["attention_mask"], batch["group_ids"])
        routing = self.network.mixture.last_routing if self.network.mixture is not None else None
        lengths = batch["attention_mask"].sum(-1)
        for i, new in enumerate(tokens):
            row = {
                "index": int(batch["index"][i]),
                "id": batch["ids"][i],
                "input": batch["inputs"][i],
                "prediction": self.decode(new),
                "references": batch["references"][i],
                "input_len": int(lengths[i]),
                "new_tokens": len(new),
                "source": batch["sources"][i],
                "group": int(batch["group_ids"][i]) if batch["has_group"][i] else -1,
            }
            if batch["demonstrations"][i] is not None:
                row["demonstrations"] = batch["demonstrations"][i]
            self.rows.append(row | routing_row(routing, i))

    def on_validation_epoch_end(self):
        metrics = {}
        if self.val_loss.update_count:
            metrics["val/loss"] = self.val_loss.compute()
        self.val_loss.reset()
        self.rows.sort(key=lambda row: row["index"])  # split order: the loaders ran longest first
        for row in self.rows:
            losses = self.input_losses.get(row["index"])
            row["loss"] = sum(losses) / len(losses) if losses else float("nan")
        if self.rows:
            score_rows(self.rows)
            metrics |= corpus_metrics(self.rows)
            metrics["val/new_tokens"] = sum(r["new_tokens"] for r in self.rows) / len(self.rows)
            if "demonstrations" in self.rows[0]:  # few-shot: demonstrations a prompt kept, on average
                metrics["val/demonstrations"] = sum(r["demonstrations"] for r in self.rows) / len(self.rows)
        metrics |= routing_metrics(self.rows, self.num_experts)
        self.log_dict({k: float(v) for k, v in metrics.items()})


# -- building, fitting, evaluating ------------------------------------------------------------------


def build(cfg: RunConfig, prefix: bool = True) -> Built:
    """Tokenizer, data and network of a generation config; prefix=False: the bare frozen backbone."""
    from transformers import AutoConfig, AutoModelForCausalLM, AutoModelForSeq2SeqLM

    if cfg.prefix.router_input == "group" and cfg.optim.objective != "sft":
        raise ConfigError("prefix.router_input=group (oracle routing) is supported for optim.objective=sft only")
    path = assets.resolve_backbone(cfg.model.backbone)
    seq2seq = bool(getattr(AutoConfig.from_pretrained(path), "is_encoder_decoder", False))
    if seq2seq and cfg.optim.objective != "sft":
        raise ConfigError(f"optim.objective={cfg.optim.objective} needs a decoder-only backbone; use sft")
    tokenizer = load_tokenizer(path)
    data = GenerationData(cfg, tokenizer, seq2seq)
    data.load()
    prefix_cfg = cfg.prefix
    if prefix_cfg.router_input == "group":
        if not data.group_names:
            raise ConfigError(
                "prefix.router_input=group routes by the source, but this generation data has none; "
                "use a built-in GEM source (gem4) or router_input=embeddings"
            )
        prefix_cfg = dataclasses.replace(prefix_cfg, num_groups=len(data.group_names))
    objective = cfg.optim.objective
    inputs = [r["input"] for r in data.train_examples]
    if objective != "sft" and not cfg.rl.bleu_weight and not e2e_slots.all_parse(inputs):
        raise ConfigError(
            f"optim.objective={objective} rewards -SER, which needs E2E meaning representations as inputs "
            "(name: X, eatType: Y, ...); for other data set rl.bleu_weight > 0"
        )
    backbone = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(path)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(backbone)
    model_cfg = cfg.model if prefix else dataclasses.replace(cfg.model, method="none")  # the model as shipped
    return Built(tokenizer, data, CausalLM(backbone, model_cfg, prefix_cfg))


def make_module(built: Built, cfg: RunConfig) -> GenerationModule:
    return GenerationModule(built.network, cfg, built.tokenizer, built.data.single_line, built.data.train_examples)


def eval_loader(built: Built, data_file: str | None):
    return built.data.val_dataloader(), "val"


def write_results(run_dir: Path, module: GenerationModule, built: Built, name: str | None) -> None:
    """samples.jsonl and, after a fit, routing.csv: id, prompt tokens, mean reference loss, new tokens, scores,
    then (few-shot runs) the demonstrations each prompt kept, then the routing."""
    rd.write_samples(run_dir / rd.samples_file(name), module.rows, module.cfg.generation.num_samples_saved)
    if name is not None:
        return
    if module.rollouts:
        rd.write_jsonl(run_dir / rd.ROLLOUTS_FILE, [r for step in module.rollouts for r in step])

    few = bool(module.rows) and "demonstrations" in module.rows[0]  # a few-shot run: demonstrations each prompt kept

    def number(row, key):
        return f"{row[key]:.4f}" if key in row else ""

    def cells(row):
        scores = [number(row, key) for key in EXAMPLE_SCORES]
        demos = [row["demonstrations"]] if few else []
        loss = f"{row['loss']:.6f}"
        return [row["id"], row.get("source") or "", row["input_len"], loss, row["new_tokens"], *scores, *demos]

    columns = ["id", "group", "input_len", "loss", "new_tokens", *EXAMPLE_SCORES, *(["demonstrations"] if few else [])]
    rd.write_per_example_table(run_dir / rd.ROUTING_FILE, module.rows, module.num_experts, columns, cells)
