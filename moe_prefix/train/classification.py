"""Sequence classification: a frozen encoder (or decoder) with a pooled linear head and any method.

A task of the run loop (see `module.Task`): data from `datamodule.ClassificationData`, the network
`networks.SequenceClassifier`, validation by accuracy, macro F1 and per-group accuracy, and one
`routing.csv` row per validation example.

Axes: b - batch, c - classes.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import torch
import torch.nn.functional as F
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from moe_prefix.injection import enable_activation_checkpointing

from . import assets
from . import data as data_io
from . import run_dir as rd
from .datamodule import ClassificationData, load_tokenizer
from .module import Built, PrefixTrainingModule, routing_metrics, routing_row
from .networks import SequenceClassifier
from .run_config import RunConfig

INIT_SEQUENCES = 256
EVALUATES_OTHER_FILES = True  # evaluate --data FILE with the run's columns and labels
HAS_ZERO_SHOT = False  # a classifier needs its trained head: there is no bare-backbone score


class ClassificationModule(PrefixTrainingModule):
    """Cross-entropy on the head's logits; validation metrics overall and per group."""

    def __init__(self, network: SequenceClassifier, cfg: RunConfig, num_classes: int, group_names: list[str]):
        super().__init__(network, cfg)
        self.group_names = list(group_names)
        self.val_acc = MulticlassAccuracy(num_classes, average="micro")
        self.val_f1 = MulticlassF1Score(num_classes, average="macro")
        self.group_acc = torch.nn.ModuleList(MulticlassAccuracy(num_classes, average="micro") for _ in self.group_names)

    def model_step(self, batch):
        out = self.network(batch["input_ids"], batch["attention_mask"], batch["group_ids"])
        losses = F.cross_entropy(out.logits.float(), batch["labels"], reduction="none")
        return losses, out

    def validation_step(self, batch, batch_idx):
        losses, out = self.model_step(batch)
        labels = batch["labels"]
        preds = out.logits.argmax(-1)
        self.val_loss.update(losses)
        self.val_acc.update(preds, labels)
        self.val_f1.update(preds, labels)
        for g, metric in enumerate(self.group_acc):
            sel = (batch["group_ids"] == g) & batch["has_group"]
            if sel.any():
                metric.update(preds[sel], labels[sel])
        lengths = batch["attention_mask"].sum(-1)
        for i in range(len(labels)):
            row = {
                "index": int(batch["index"][i]),
                "label": int(labels[i]),
                "prediction": int(preds[i]),
                "loss": float(losses[i]),
                "input_len": int(lengths[i]),
                "group": int(batch["group_ids"][i]) if batch["has_group"][i] else -1,
            }
            self.rows.append(row | routing_row(out.routing, i))

    def on_validation_epoch_end(self):
        metrics = {
            "val/loss": self.val_loss.compute(),
            "val/acc": self.val_acc.compute(),
            "val/f1": self.val_f1.compute(),
        }
        for name, metric in zip(self.group_names, self.group_acc, strict=True):
            if metric.update_count:
                metrics[f"val/acc/{name}"] = metric.compute()
            metric.reset()
        metrics |= routing_metrics(self.rows, self.num_experts)
        self.log_dict(metrics)
        for m in (self.val_loss, self.val_acc, self.val_f1):
            m.reset()


def build(cfg: RunConfig, prefix: bool = True) -> Built:
    from transformers import AutoModel

    path = assets.resolve_backbone(cfg.model.backbone)
    tokenizer = load_tokenizer(path)
    data = ClassificationData(cfg, tokenizer)
    data.load()
    prefix_cfg = cfg.prefix
    if prefix_cfg.router_input == "group":
        prefix_cfg = dataclasses.replace(prefix_cfg, num_groups=max(len(data.group_names), 1))
    backbone = AutoModel.from_pretrained(path)
    if cfg.model.gradient_checkpointing:
        enable_activation_checkpointing(backbone)
    network = SequenceClassifier(backbone, data.num_classes, cfg.model, prefix_cfg)
    return Built(tokenizer, data, network)


def make_module(built: Built, cfg: RunConfig) -> ClassificationModule:
    return ClassificationModule(built.network, cfg, built.data.num_classes, built.data.group_names)


def eval_loader(built: Built, data_file: str | None):
    """The run's validation split, or another file with the run's columns and labels."""
    data = built.data
    if not data_file:
        return data.val_dataloader(), "val"
    d = data.cfg.data
    columns = (d.text_column, d.label_column, d.group_column)
    drop, seed = d.drop_empty_texts, d.split_seed
    examples = data_io.load_examples(data_file, *columns, split=d.val_split, drop_empty_texts=drop, seed=seed)
    data_io.check_labels(data.train_examples, examples)
    return data.eval_loader(data.encode_examples(examples)), Path(data_file).stem


def write_results(run_dir: Path, module: ClassificationModule, built: Built, name: str | None) -> None:
    """labels.json and routing.csv after a fit: id, group, label and prediction (class index and name), loss,
    input length, routing."""
    if name is not None:
        return  # an evaluation's rows may come from another file: its metrics are the result
    examples = built.data.val_examples
    classes = list(built.data.label_vocab)  # class index -> the label as the data names it (ClassLabel: its name)
    rd.write_json(run_dir / rd.LABELS_FILE, {"label_column": built.data.cfg.data.label_column, "classes": classes})

    def cells(row):
        ex, label, pred = examples[row["index"]], row["label"], row["prediction"]
        label_cells = [label, classes[label], pred, classes[pred]]
        return [ex.id, ex.group or "", *label_cells, f"{row['loss']:.6f}", row["input_len"]]

    columns = ["id", "group", "label", "label_name", "prediction", "prediction_name", "loss", "input_len"]
    rd.write_per_example_table(run_dir / rd.ROUTING_FILE, module.rows, module.num_experts, columns, cells)
