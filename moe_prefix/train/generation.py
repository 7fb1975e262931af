"""Generation: a frozen causal LM learns to write a text for an input through the routed prefix.

The task is E2E NLG style data-to-text (Li & Liang 2021 evaluate prefix tuning on it): a meaning
representation goes in, a restaurant description comes out, and every input has several references.

- Data: one training pair per (input, reference); the split is by input, so no input has references
  on both sides. A pair's tokens are prompt + target + eos; the loss covers target and eos only
  (labels -100 on the prompt and on padding). The router sees the prompt alone, so what it picks
  at training time is what it can pick at generation time, when no target exists yet.
- Validation: the loss on every reference, then each input is decoded once with `generate()` (greedy
  or beam search, per `cfg.generation`) through the prefix routed from its prompt, and scored against
  all its references: corpus BLEU (SacreBLEU, 13a tokenisation) and ROUGE-L F-measure (best reference
  per input), both on a 0-100 scale.
- `fit_generation(cfg)` writes the run directory that classification writes, plus `samples.jsonl`.
- `evaluate_generation(run_dir, no_prefix=True)` scores the bare backbone on the same split and prompts:
  the zero-shot reference a prefix has to beat.

Axes: b - batch, t - tokens, v - vocabulary, e - experts.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch.utils.data import DataLoader

from moe_prefix.analysis.routing_stats import detect_collapse

from . import assets
from . import data as data_io
from .checkpointing import check_compatible
from .datamodule import ClassificationData, Encoded, load_tokenizer, pad_batch, subsample
from .engine import (
    CONFIG_FILE,
    ROUTING_FILE,
    WEIGHTS_FILE,
    FitResult,
    PrefixTrainingModule,
    _init_from_training_text,
    _saved_backbone,
    evaluate_module,
    routing_summary,
    start_run,
    train_module,
    write_per_example_table,
    write_weights_and_metrics,
)
from .networks import CausalLM, trainable_state_dict
from .run_config import ConfigError, RunConfig, check_sources, config_from_dict

SAMPLES_FILE = "samples.jsonl"
INIT_SEQUENCES = 32  # training sequences whose keys/values seed the banks (prefix.init=tokens)


# -- scores -------------------------------------------------------------------------------------------


def generation_scores(predictions: list[str], references: list[list[str]]) -> dict[str, float]:
    """Corpus BLEU and mean ROUGE-L F-measure, 0-100, against every input's references.

    BLEU is SacreBLEU's (13a tokenisation, n-gram counts clipped by the most generous reference, brevity
    penalty from the closest reference length), computed by torchmetrics without network access.
    ROUGE-L scores each input by its best reference (highest LCS F-measure) and averages over inputs.
    Neither needs NLTK data (no stemming, no sentence splitting).
    """
    from torchmetrics.functional.text import rouge_score, sacre_bleu_score

    if not predictions:
        return {"bleu": float("nan"), "rougeL": float("nan")}
    bleu = sacre_bleu_score(predictions, references, tokenize="13a")
    rouge = rouge_score(predictions, references, rouge_keys="rougeL", accumulate="best")
    return {"bleu": 100 * float(bleu), "rougeL": 100 * float(rouge["rougeL_fmeasure"])}


# -- data ---------------------------------------------------------------------------------------------


def load_records(source: str, input_column: str, target_column: str) -> list[dict]:
    """Generation records {id, input, targets}: one per distinct input, all its references together.

    `source` is `e2e_nlg` (or a BIG-bench task.json / its folder) or a .jsonl file whose rows hold an
    input and a target (a string or a list of strings); rows that repeat an input add references.
    Generation data has no group column: data.group_column is not read.
    """
    path = assets.resolve_dataset(source)
    if source == "e2e_nlg" or path.is_dir() or path.suffix == ".json":
        return data_io.load_e2e(source)
    if path.suffix != ".jsonl":
        raise data_io.DataError(
            f"unsupported generation data {source}: use e2e_nlg, a BIG-bench task.json or a .jsonl file"
        )
    grouped: dict[str, dict] = {}
    for line_no, row in data_io._jsonl_rows(path):
        data_io._require_column(input_column, row.keys(), "data.text_column", str(path))
        data_io._require_column(target_column, row.keys(), "data.label_column", str(path))
        text, target = row[input_column], row[target_column]
        targets = [target] if isinstance(target, str) else target
        if not isinstance(text, str) or not isinstance(targets, list) or not all(isinstance(t, str) for t in targets):
            raise data_io.DataError(
                f"{path}:{line_no}: expected a string input and a string (or list of strings) target"
            )
        record = grouped.setdefault(text, {"id": str(row.get("id", len(grouped))), "input": text, "targets": []})
        record["targets"].extend(targets)
    return list(grouped.values())


class GenerationData(L.LightningDataModule):
    """Prompt/target pairs for training, pairs and prompts for validation.

    Training batches are right-padded and carry `labels` (-100 on prompt and padding) and
    `router_input_ids` / `router_attention_mask` (the prompt alone). Generation batches are
    left-padded prompts, so every row's new tokens start in the same column.
    """

    def __init__(self, cfg: RunConfig, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.loaded = False

    # Resumable training order: the same seeded permutation and mid-epoch skip as classification.
    train_dataloader = ClassificationData.train_dataloader
    _resumed_examples = ClassificationData._resumed_examples

    def load(self) -> None:
        """Read, split by input and tokenise once; safe to call again."""
        if self.loaded:
            return
        d = self.cfg.data
        read = lambda src: load_records(src, d.text_column, d.label_column)  # noqa: E731
        records = read(d.source)
        if d.val_source:
            train, val = records, read(d.val_source)
            shared = {r["input"] for r in train} & {r["input"] for r in val}
            if shared:
                raise data_io.DataError(
                    f"{len(shared)} input(s) of data.val_source also occur in data.source, e.g. {min(shared)!r}"
                )
        else:
            train, val = data_io.split_by_input(records, d.val_fraction, d.split_seed)
        # max_*_examples count inputs, so a subsample keeps every reference of what it keeps
        self.train_examples = subsample(train, d.max_train_examples, d.split_seed)
        self.val_examples = subsample(val, d.max_val_examples, d.split_seed)
        # Targets of one line: decoding ends at the first line break, for every model alike.
        self.single_line = not any("\n" in t for r in self.train_examples for t in r["targets"])
        self.train_set = self.encode_pairs(self.train_examples)
        self.val_pairs = self.encode_pairs(self.val_examples)
        self.val_prompts = self.encode_prompts(self.val_examples)
        self.loaded = True

    def setup(self, stage: str | None = None) -> None:
        self.load()

    # -- tokens -------------------------------------------------------------------------------------
    def _prompt_ids(self, records) -> list[list[int]]:
        prompts = [self.cfg.data.prompt_format.format(input=r["input"]) for r in records]
        return self.tokenizer(prompts)["input_ids"]

    def encode_pairs(self, records) -> list[Encoded]:
        """One example per (input, reference): prompt + target + eos; `router_len` marks the prompt."""
        max_len = self.cfg.model.max_length
        eos = self.tokenizer.eos_token_id
        if eos is None:
            raise ConfigError("the backbone's tokenizer has no eos token; generation needs one to stop")
        prompts = self._prompt_ids(records)
        flat = [(i, t) for i, r in enumerate(records) for t in r["targets"]]
        targets = self.tokenizer([t for _, t in flat], add_special_tokens=False)["input_ids"] if flat else []
        items, truncated = [], 0
        for (i, _), target in zip(flat, targets, strict=True):
            prompt = prompts[i][: max_len - 1]  # at least one target token survives
            ids = prompt + target + [eos]
            truncated += len(ids) > max_len or len(prompts[i]) > len(prompt)
            items.append(Encoded(index=i, input_ids=ids[:max_len], router_len=len(prompt)))
        if truncated:
            warnings.warn(
                f"{truncated} of {len(items)} prompt+target sequences are longer than "
                f"model.max_length={max_len} tokens and were truncated",
                stacklevel=2,
            )
        return items

    def encode_prompts(self, records) -> list[Encoded]:
        """One example per input: the prompt alone, cut as the training pairs cut it."""
        max_len = self.cfg.model.max_length
        return [
            Encoded(index=i, input_ids=ids[: max_len - 1], router_len=len(ids[: max_len - 1]))
            for i, ids in enumerate(self._prompt_ids(records))
        ]

    # -- batches ------------------------------------------------------------------------------------
    @property
    def pad_id(self) -> int:
        return self.tokenizer.pad_token_id

    def _collate(self, items: list[Encoded]) -> dict[str, torch.Tensor]:
        """Right-padded pairs: (b t) input_ids, attention_mask, labels; (b t') router_*."""
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
            "index": batch["index"],
        }

    def _collate_prompts(self, items: list[Encoded], records) -> dict:
        """Left-padded prompts (b t), with their ids and references (lists of strings)."""
        batch = pad_batch(items, self.pad_id, left=True)
        return {
            "input_ids": batch["input_ids"],
            "attention_mask": batch["attention_mask"],
            "index": batch["index"],
            "ids": [records[x.index]["id"] for x in items],
            "references": [records[x.index]["targets"] for x in items],
        }

    def loss_loader(self, pairs: list[Encoded]) -> DataLoader:
        d = self.cfg.data
        return DataLoader(
            pairs, batch_size=d.eval_batch_size, shuffle=False, collate_fn=self._collate, num_workers=d.num_workers
        )

    def generation_loader(self, prompts: list[Encoded], records) -> DataLoader:
        d = self.cfg.data
        collate = lambda items: self._collate_prompts(items, records)  # noqa: E731
        return DataLoader(
            prompts, batch_size=d.eval_batch_size, shuffle=False, collate_fn=collate, num_workers=d.num_workers
        )

    def val_dataloader(self):
        """Two loaders: dataloader_idx 0 holds the reference pairs (loss), 1 the prompts (decoding)."""
        return [self.loss_loader(self.val_pairs), self.generation_loader(self.val_prompts, self.val_examples)]


# -- the Lightning module ---------------------------------------------------------------------------


def token_losses(logits: torch.Tensor, labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Next-token cross-entropy: logits (b t v), labels (b t) -> losses (b t-1), mask of scored tokens."""
    logits, labels = logits[:, :-1].float(), labels[:, 1:]
    losses = F.cross_entropy(logits.transpose(1, 2), labels, ignore_index=-100, reduction="none")
    return losses, labels != -100


class GenerationModule(PrefixTrainingModule):
    """A causal LM with any method; trains like TaskModule, validates by loss and by decoding."""

    def __init__(self, network: CausalLM, cfg: RunConfig, tokenizer, single_line: bool = True):
        super().__init__(network, cfg)  # self.rows: one per decoded input
        self.tokenizer = tokenizer
        self.single_line = single_line  # cut predictions at the first line break
        self.input_losses: dict[int, list[float]] = {}  # input index -> loss of each reference

    def forward_pairs(self, batch):
        """Losses (b t-1) and scored-token mask of a pair batch, and the network output."""
        out = self.network(
            batch["input_ids"],
            batch["attention_mask"],
            router_input_ids=batch["router_input_ids"],
            router_attention_mask=batch["router_attention_mask"],
        )
        losses, scored = token_losses(out.logits, batch["labels"])
        return losses, scored, out

    def model_step(self, batch):
        """The loss of every target token of the batch (their mean is the training loss)."""
        losses, scored, out = self.forward_pairs(batch)
        return losses[scored], out

    # -- decoding -----------------------------------------------------------------------------------
    def generate_tokens(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> list[list[int]]:
        """New tokens per left-padded prompt (b t), up to and excluding eos."""
        g = self.cfg.generation
        eos, pad = self.tokenizer.eos_token_id, self.tokenizer.pad_token_id
        out = self.network.generate(
            input_ids,
            attention_mask,
            max_new_tokens=g.max_new_tokens,
            num_beams=g.num_beams,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )
        new = out[:, input_ids.shape[1] :].tolist()
        return [row[: row.index(eos)] if eos in row else row for row in new]

    def decode(self, tokens: list[int]) -> str:
        text = self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
        return text.split("\n")[0].strip() if self.single_line else text

    # -- validation ---------------------------------------------------------------------------------
    def on_validation_epoch_start(self):
        self.rows, self.input_losses = [], {}

    def validation_step(self, batch, batch_idx, dataloader_idx=0):
        if dataloader_idx == 0:
            losses, scored, _ = self.forward_pairs(batch)
            counts = scored.sum(-1)
            per_pair = (losses * scored).sum(-1) / counts.clamp_min(1)
            self.val_loss.update(per_pair, weight=counts)  # a token-level mean, like train/loss
            for i, loss in zip(batch["index"].tolist(), per_pair.tolist(), strict=True):
                self.input_losses.setdefault(i, []).append(loss)
            return
        tokens = self.generate_tokens(batch["input_ids"], batch["attention_mask"])
        mixture = self.network.mixture
        routing = mixture.last_routing if mixture is not None else None
        lengths = batch["attention_mask"].sum(-1)
        for i, new in enumerate(tokens):
            row = {
                "index": int(batch["index"][i]),
                "id": batch["ids"][i],
                "prediction": self.decode(new),
                "references": batch["references"][i],
                "input_len": int(lengths[i]),
                "new_tokens": len(new),
            }
            if routing is not None:
                row["weights"] = routing.weights[i].tolist()
                row["experts"] = routing.indices[i].tolist()
                row["prefix_len"] = float(routing.lengths[i])
            self.rows.append(row)

    def on_validation_epoch_end(self):
        metrics = {}
        if self.val_loss.update_count:
            metrics["val/loss"] = self.val_loss.compute()
        self.val_loss.reset()
        for row in self.rows:
            losses = self.input_losses.get(row["index"])
            row["loss"] = sum(losses) / len(losses) if losses else float("nan")
        if self.rows:
            scores = generation_scores([r["prediction"] for r in self.rows], [r["references"] for r in self.rows])
            metrics["val/bleu"] = scores["bleu"]
            metrics["val/rougeL"] = scores["rougeL"]
            metrics["val/new_tokens"] = sum(r["new_tokens"] for r in self.rows) / len(self.rows)
        if self.rows and "weights" in self.rows[0]:
            weights = torch.tensor([r["weights"] for r in self.rows])
            experts = torch.tensor([r["experts"] for r in self.rows])
            summary = routing_summary(weights, experts, self.num_experts)
            metrics["val/router_entropy"] = summary["entropy"]
            metrics["val/prefix_len"] = sum(r["prefix_len"] for r in self.rows) / len(self.rows)
            # Slot counts cannot show a collapse under top-k > 1 (no expert fills more than 1/k of the
            # slots); the mean routing weight, each expert's share of the blended prefix, can.
            share = weights.mean(0)
            for i, (v, w) in enumerate(zip(summary["load"], share, strict=True)):
                metrics[f"val/load/e{i}"] = v
                metrics[f"val/weight/e{i}"] = w
            collapse = self.num_experts > 1 and detect_collapse(share.numpy())
            if collapse:
                warnings.warn(
                    f"routing collapse: expert {collapse.expert} carries {collapse.share:.0%} of the routing weight; "
                    "raise prefix.balance_coef or prefix.router_noise",
                    stacklevel=1,
                )
        self.log_dict({k: float(v) for k, v in metrics.items()})


# -- building, fitting, evaluating ------------------------------------------------------------------


def build_generation(cfg: RunConfig, prefix: bool = True):
    """Tokenizer, data and network of a generation config; prefix=False: the bare frozen backbone."""
    from transformers import AutoModelForCausalLM

    check_sources(cfg)
    if cfg.prefix.router_input == "group":
        raise ConfigError("prefix.router_input=group is not supported for generation; use embeddings or hidden")
    path = assets.resolve_backbone(cfg.model.backbone)
    tokenizer = load_tokenizer(path)
    data = GenerationData(cfg, tokenizer)
    data.load()
    backbone = AutoModelForCausalLM.from_pretrained(path)
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    # linear_probe leaves the backbone frozen and adds nothing: for a causal LM, the model as shipped.
    model_cfg = cfg.model if prefix else dataclasses.replace(cfg.model, method="linear_probe")
    network = CausalLM(backbone, model_cfg, cfg.prefix)
    return tokenizer, data, network


def fit_generation(cfg: RunConfig, resume: bool = False) -> FitResult:
    """Train one generation run and write its run directory (see `training.fit`)."""
    cfg, run_dir = start_run(cfg, resume)
    tokenizer, data, network = build_generation(cfg)
    if cfg.prefix.init == "tokens" and network.mixture is not None and not resume:
        _init_from_training_text(network, data, n=INIT_SEQUENCES)
    module = GenerationModule(network, cfg, tokenizer, data.single_line)
    stats = train_module(cfg, run_dir, module, data, resume)
    if stats is None:
        return FitResult(run_dir, {})
    metrics = {**evaluate_module(module, data, cfg), **stats}
    write_weights_and_metrics(run_dir, network, cfg, metrics)
    write_samples(run_dir / SAMPLES_FILE, module.rows, cfg.generation.num_samples_saved)
    write_routing_table(run_dir / ROUTING_FILE, module.rows, cfg.prefix.num_experts)
    return FitResult(run_dir, metrics)


def write_samples(path: Path, rows: list[dict], n: int) -> None:
    """The first n validation inputs (in split order): id, prediction, references; one JSON per line."""
    with open(path, "w") as f:
        for row in sorted(rows, key=lambda r: r["index"])[:n]:
            sample = {k: row[k] for k in ("id", "prediction", "references")}
            f.write(json.dumps(sample, ensure_ascii=False) + "\n")


def write_routing_table(path: Path, rows: list[dict], num_experts: int) -> None:
    """One row per validation input: id, prompt tokens, mean reference loss, new tokens, routing."""

    def cells(row):
        return [row["id"], row["input_len"], f"{row['loss']:.6f}", row["new_tokens"]]

    write_per_example_table(path, rows, num_experts, ["id", "input_len", "loss", "new_tokens"], cells)


def evaluate_generation(run_dir: str | Path, no_prefix: bool = False) -> dict[str, float]:
    """Validate a finished run again, or (no_prefix) its bare backbone on the same split and prompts.

    Writes eval-val.json and samples-val.jsonl (eval-val-noprefix.json and samples-val-noprefix.jsonl
    with no_prefix) into the run directory.
    """
    from omegaconf import OmegaConf

    run_dir = Path(run_dir)
    if not (run_dir / CONFIG_FILE).is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    cfg = config_from_dict(OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE)))
    if cfg.model.task != "generation":
        raise ConfigError(f"{run_dir} is a {cfg.model.task} run; evaluate_generation needs a generation run")
    L.seed_everything(cfg.seed, verbose=False)
    tokenizer, data, network = build_generation(cfg, prefix=not no_prefix)
    if not no_prefix:
        weights = load_file(str(run_dir / WEIGHTS_FILE))
        expected = trainable_state_dict(network)
        check_compatible(weights, expected, _saved_backbone(run_dir), cfg.model.backbone)
        network.load_state_dict(weights, strict=False)
    module = GenerationModule(network, cfg, tokenizer, data.single_line)
    metrics = evaluate_module(module, data, cfg)
    name = "val-noprefix" if no_prefix else "val"
    (run_dir / f"eval-{name}.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    write_samples(run_dir / f"samples-{name}.jsonl", module.rows, cfg.generation.num_samples_saved)
    return metrics
