"""Batches for training and evaluation: tokenised once, padded per batch, resumable mid-epoch.

Axes: b - batch, t - tokens.

The training order of epoch e is a permutation seeded by (seed, e), and a run resumed at step s skips
the batches it already saw, so an interrupted and resumed run visits exactly the batches an
uninterrupted one does.
"""

from __future__ import annotations

import random
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import lightning as L
import torch
from torch.utils.data import DataLoader, Sampler

from . import data as data_io
from .hf_sources import source_splits
from .run_config import DataConfig, RunConfig


@dataclass
class Encoded:
    """One tokenised example."""

    index: int  # position in its split: joins predictions back to the examples
    input_ids: list[int]
    label: int = -100  # class index (classification)
    group: int = -1  # group index, -1 when the data has no group column
    router_len: int = 0  # generation: prompt tokens (what the router may see)


class EpochSampler(Sampler[int]):
    """A seeded permutation per epoch that can start part-way in (after a resume).

    Under data parallelism process r of w takes every w-th example from position r of the same
    permutation, so at each step the processes together see exactly the global batch that a single
    process with a w times larger batch would see.
    """

    def __init__(self, n: int, seed: int, skip_fn=None, rank: int = 0, world: int = 1):
        self.n, self.seed, self.epoch, self.skip = n, seed, 0, 0
        self.rank, self.world = rank, world
        self.skip_fn = skip_fn  # asked once, at the first epoch: how many examples a resumed run already saw

    def set_epoch(self, epoch: int) -> None:  # Lightning calls this at every epoch start
        self.epoch = epoch

    def __iter__(self):
        order = list(range(self.n))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        if self.skip_fn is not None:
            self.skip, self.skip_fn = self.skip_fn(), None
        start, self.skip = self.skip, 0
        return iter(order[start:][self.rank :: self.world])

    def __len__(self) -> int:
        return len(range(self.rank, self.n - self.skip, self.world))


def pad_tokens(rows: list[list[int]], pad_id: int, left: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """Token lists -> padded ids and mask (n t); left-padded, every row's next token lands in the same column."""
    t = max(len(r) for r in rows)
    ids = torch.full((len(rows), t), pad_id, dtype=torch.long)
    mask = torch.zeros((len(rows), t), dtype=torch.long)
    for i, r in enumerate(rows):
        sl = slice(t - len(r), t) if left else slice(0, len(r))
        ids[i, sl] = torch.tensor(r, dtype=torch.long)
        mask[i, sl] = 1
    return ids, mask


def pad_batch(items: list[Encoded], pad_id: int, left: bool = False) -> dict[str, torch.Tensor]:
    ids, mask = pad_tokens([x.input_ids for x in items], pad_id, left)
    return {
        "input_ids": ids,
        "attention_mask": mask,
        "labels": torch.tensor([x.label for x in items]),
        "group_ids": torch.tensor([max(x.group, 0) for x in items]),
        "has_group": torch.tensor([x.group >= 0 for x in items]),
        "index": torch.tensor([x.index for x in items]),
    }


def load_tokenizer(path):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(path)
    if tokenizer.pad_token_id is None:  # decoders often ship without one; padding is masked anyway
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


class TrainData(L.LightningDataModule):
    """What every task's data shares: load once, a resumable seeded training order, `collate`.

    A task's data defines `load()` (read, split and tokenise once; safe to call again, filling `train_set`)
    and `collate(items)` (a training batch of encoded examples).
    """

    def __init__(self, cfg: RunConfig, tokenizer):
        super().__init__()
        self.cfg, self.tokenizer = cfg, tokenizer
        self.loaded = False
        self.train_set: list[Encoded] = []

    def setup(self, stage: str | None = None) -> None:
        self.load()

    def first_training_batch(self, n: int) -> dict[str, torch.Tensor]:
        """The first n training examples as one batch (their keys/values seed banks with prefix.init=tokens)."""
        return self.collate(self.train_set[:n])

    def router_sample(self, n: int, seed: int):
        """Batches of a seeded random sample of n training inputs, as the router sees them."""
        batches = self.eval_loader(subsample(self.train_set, n, seed))
        return [{**b, **self.router_view(b)} for b in batches]

    def router_view(self, batch: dict) -> dict:
        """The part of a training batch the router reads (generation: the prompt alone)."""
        return {}

    def train_dataloader(self):
        trainer = self.trainer
        rank, world = (trainer.global_rank, trainer.world_size) if trainer is not None else (0, 1)
        sampler = EpochSampler(len(self.train_set), self.cfg.seed, self._resumed_examples, rank, world)
        return DataLoader(
            self.train_set,
            batch_size=self.cfg.data.batch_size,
            sampler=sampler,
            collate_fn=self.collate,
            num_workers=self.cfg.data.num_workers,
        )

    def _resumed_examples(self) -> int:
        """Examples of the current epoch a resumed run already trained on (0 for a fresh run).

        Called when the first epoch's iterator is made, after Lightning restored the step counter.
        """
        trainer = self.trainer
        if trainer is None or trainer.global_step == 0:
            return 0
        global_batch = self.cfg.data.batch_size * trainer.world_size  # the sampler is sharded across processes
        per_epoch = -(-len(self.train_set) // global_batch)
        return (trainer.global_step % per_epoch) * global_batch

    def eval_loader(self, items: list, collate=None) -> DataLoader:
        """Evaluation batches in split order (`collate` defaults to the training one)."""
        d = self.cfg.data
        return DataLoader(
            items,
            batch_size=d.eval_batch_size,
            shuffle=False,
            collate_fn=collate or self.collate,
            num_workers=d.num_workers,
        )


def read_train_val(d: DataConfig, read: Callable[[str, str | None], list], split: Callable) -> tuple[list, list]:
    """Training and validation items of any task: data.val_source when given, else the source's own
    validation split (data.val_split of a DatasetDict or hub dataset), else a seeded split of the source.

    read(source, split_name) loads one source; split(items, fraction, seed) is the task's seeded split.
    """
    if d.val_source:
        return read(d.source, d.train_split), read(d.val_source, d.val_split)
    if d.val_split is not None and d.val_split in source_splits(d.source):
        return read(d.source, d.train_split), read(d.source, d.val_split)
    return split(read(d.source, d.train_split), d.val_fraction, d.split_seed)


class ClassificationData(TrainData):
    """Text classification from a built-in dataset, the user's file or folder, or a hub dataset."""

    def load(self) -> None:
        if self.loaded:
            return
        d = self.cfg.data

        def read(source: str, split: str | None) -> list[data_io.TextExample]:
            columns = (d.text_column, d.label_column, d.group_column)
            drop, seed = d.drop_empty_texts, d.split_seed  # seed: the subsample of multisource4, same for every arm
            return data_io.load_examples(source, *columns, split=split, drop_empty_texts=drop, seed=seed)

        train, val = read_train_val(d, read, data_io.train_val_split)
        train = subsample(train, d.max_train_examples, d.split_seed)
        val = subsample(val, d.max_val_examples, d.split_seed)
        data_io.check_classes(train, d.label_column)
        data_io.check_labels(train, val)
        self.train_examples, self.val_examples = train, val
        self.label_vocab = data_io.build_label_vocab(train)
        groups = sorted({ex.group for ex in train + val if ex.group is not None})
        self.group_names = groups
        self.group_vocab = {g: i for i, g in enumerate(groups)}
        (self.train_set, cut_train), (self.val_set, cut_val) = self._encode(train), self._encode(val)
        if cut_train or cut_val:  # one warning for both splits
            warnings.warn(
                f"{cut_train} of {len(train)} training and {cut_val} of {len(val)} validation texts are longer than "
                f"model.max_length={self.cfg.model.max_length} tokens and were truncated",
                stacklevel=1,  # Lightning calls setup(); its line would say nothing
            )
        self.loaded = True

    def encode_examples(self, examples) -> list[Encoded]:
        """Tokenise examples with this run's label and group vocabularies (another file, at evaluation)."""
        encoded, too_long = self._encode(examples)
        if too_long:
            warnings.warn(
                f"{too_long} of {len(examples)} texts are longer than model.max_length={self.cfg.model.max_length} "
                "tokens and were truncated",
                stacklevel=2,
            )
        return encoded

    def _encode(self, examples) -> tuple[list[Encoded], int]:
        """The encoded examples, and how many were cut to model.max_length."""
        max_len = self.cfg.model.max_length
        ids = self.tokenizer([ex.text for ex in examples], truncation=False)["input_ids"]
        too_long = sum(len(x) > max_len for x in ids)
        return [
            Encoded(
                index=i,
                input_ids=x[:max_len],
                label=self.label_vocab.get(ex.label, -100),
                group=self.group_vocab.get(ex.group, -1),
            )
            for i, (ex, x) in enumerate(zip(examples, ids, strict=True))
        ], too_long

    @property
    def num_classes(self) -> int:
        return len(self.label_vocab)

    def collate(self, items):
        return pad_batch(items, self.tokenizer.pad_token_id)

    def val_dataloader(self):
        return self.eval_loader(self.val_set)


def subsample(items: list, n: int | None, seed: int) -> list:
    """A seeded subset of n items in their original order (all of them when n is None or too large)."""
    if n is None or n >= len(items):
        return items
    keep = sorted(random.Random(seed).sample(range(len(items)), n))
    return [items[i] for i in keep]
