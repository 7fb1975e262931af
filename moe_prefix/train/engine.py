"""Training: the LightningModule shared by every method, and `fit(cfg)`, the one entry point.

Scripts, notebooks, tests and the ablation runner all call `fit(cfg)`; there is no second loop.
Axes: b - batch, e - experts, k - banks per input, c - classes.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import lightning as L
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import Callback, ModelCheckpoint, OnExceptionCheckpoint
from lightning.pytorch.loggers import CSVLogger
from safetensors.torch import load_file, save_file
from torchmetrics import MeanMetric
from torchmetrics.classification import MulticlassAccuracy, MulticlassF1Score

from moe_prefix.analysis.routing_stats import detect_collapse

from . import assets
from .checkpointing import SafetensorsCheckpointIO, check_compatible
from .datamodule import ClassificationData, load_tokenizer
from .networks import SequenceClassifier, trainable_state_dict
from .run_config import ConfigError, RunConfig, check_sources, save_config, to_dict

WEIGHTS_FILE = "adapter.safetensors"
ROUTING_FILE = "routing.csv"
METRICS_FILE = "metrics.json"
CONFIG_FILE = "config.yaml"


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def routing_summary(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """Mean per-example routing entropy (nats) and each expert's share of routing slots."""
    w = weights.float().clamp_min(1e-12)
    entropy = -(weights.float() * w.log()).sum(-1).mean()
    load = F.one_hot(indices, num_experts).float().sum((0, 1)) / indices.numel()
    return {"entropy": entropy, "load": load}


class PrefixTrainingModule(L.LightningModule):
    """What every task shares: per-step seeds, logged routing statistics, the optimiser and schedule,
    and checkpoints that hold only trainable tensors. Subclasses define `model_step` and validation."""

    def __init__(self, network, cfg: RunConfig):
        super().__init__()
        self.network, self.cfg = network, cfg
        # The frozen backbone is left out of checkpoints, so loading them must not require it.
        self.strict_loading = False
        self.val_loss = MeanMetric()
        self.rows: list[dict] = []

    @property
    def num_experts(self) -> int:
        return self.cfg.prefix.num_experts

    def model_step(self, batch):
        """Per-example losses (b) and the network output for a batch."""
        raise NotImplementedError

    def on_train_batch_start(self, batch, batch_idx):
        # Randomness (dropout, router noise) is a function of the step alone, so a resumed run
        # draws exactly what an uninterrupted one would have drawn.
        torch.manual_seed(self.cfg.seed * 1_000_003 + self.global_step)

    def training_step(self, batch, batch_idx):
        losses, out = self.model_step(batch)
        loss = losses.mean()
        total = loss
        b = batch["input_ids"].shape[0]
        self.log("train/loss", loss, prog_bar=True, batch_size=b)
        if out.routing is not None:
            r = out.routing
            total = loss + r.aux_loss
            summary = routing_summary(r.weights, r.indices, self.num_experts)
            self.log_dict(
                {
                    "train/aux_loss": r.aux_loss,
                    "train/balance_loss": r.balance_loss,
                    "train/z_loss": r.z_loss,
                    "train/length_cost": r.length_cost,
                    "train/router_entropy": summary["entropy"],
                    "train/prefix_len": r.lengths.mean(),
                    **{f"train/load/e{i}": v for i, v in enumerate(summary["load"])},
                },
                batch_size=b,
                sync_dist=True,  # routing statistics over the global batch under DDP
            )
        if not torch.isfinite(total):
            raise NonFiniteLossError(
                f"non-finite loss {total.item()} at step {self.global_step}; the last good checkpoint is kept. "
                "Lower optim.lr or check the data."
            )
        return total

    def configure_optimizers(self):
        o = self.cfg.optim
        head = [p for n, p in self.network.named_parameters() if p.requires_grad and n.startswith("head.")]
        rest = [p for n, p in self.network.named_parameters() if p.requires_grad and not n.startswith("head.")]
        groups = [{"params": rest, "lr": o.lr}]
        if head:
            groups.append({"params": head, "lr": o.head_lr or o.lr})
        optimizer = torch.optim.AdamW([g for g in groups if g["params"]], weight_decay=o.weight_decay)
        if o.schedule == "constant":
            return optimizer
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        if total < 4:  # too short for a warm-up phase (OneCycleLR divides by its length)
            return optimizer
        max_lrs = [g["lr"] for g in optimizer.param_groups]
        if o.schedule == "onecycle":
            scheduler = torch.optim.lr_scheduler.OneCycleLR(
                optimizer, max_lr=max_lrs, total_steps=total, pct_start=o.warmup_fraction
            )
        else:
            scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def on_save_checkpoint(self, checkpoint):
        trainable = {f"network.{k}" for k in trainable_state_dict(self.network)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["moe_prefix"] = {"backbone": self.cfg.model.backbone, "method": self.cfg.model.method}

    def on_load_checkpoint(self, checkpoint):
        expected = {f"network.{k}": v for k, v in trainable_state_dict(self.network).items()}
        saved_model = checkpoint.get("moe_prefix", {}).get("backbone", "unknown")
        check_compatible(checkpoint["state_dict"], expected, saved_model, self.cfg.model.backbone)


class TaskModule(PrefixTrainingModule):
    """Sequence classification with any method; logs task, auxiliary and routing statistics."""

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

    def on_validation_epoch_start(self):
        self.rows = []

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
            }
            if out.routing is not None:
                row["weights"] = out.routing.weights[i].tolist()
                row["experts"] = out.routing.indices[i].tolist()
                row["prefix_len"] = float(out.routing.lengths[i])
            self.rows.append(row)

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
        if self.rows and "weights" in self.rows[0]:
            weights = torch.tensor([r["weights"] for r in self.rows])
            experts = torch.tensor([r["experts"] for r in self.rows])
            summary = routing_summary(weights, experts, self.num_experts)
            metrics["val/router_entropy"] = summary["entropy"]
            metrics["val/prefix_len"] = torch.tensor([r["prefix_len"] for r in self.rows]).mean()
            for i, v in enumerate(summary["load"]):
                metrics[f"val/load/e{i}"] = v
            # On the mean routing weight: slot counts cannot exceed 1/k per expert, so they hide collapse.
            collapse = detect_collapse(weights.float().mean(0).numpy())
            if collapse and self.num_experts > 1:
                warnings.warn(
                    f"routing collapse: expert {collapse.expert} takes {collapse.share:.0%} of the load; "
                    "raise prefix.balance_coef or prefix.router_noise",
                    stacklevel=1,
                )
        self.log_dict(metrics)
        for m in (self.val_loss, self.val_acc, self.val_f1):
            m.reset()


class _InterruptCheckpoint(OnExceptionCheckpoint):
    """Save on Ctrl-C or a crash, but never a state that just produced a non-finite loss."""

    def on_exception(self, trainer, pl_module, exception):
        if not isinstance(exception, NonFiniteLossError):
            super().on_exception(trainer, pl_module, exception)


class _Timer(Callback):
    """Wall time of training proper (excludes loading and the final evaluation)."""

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = time.perf_counter() - self.start


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, float]


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def build(cfg: RunConfig):
    """Tokenizer, data and network for a config (shared by fit, evaluate and the analysis)."""
    from transformers import AutoModel

    check_sources(cfg)
    path = assets.resolve_backbone(cfg.model.backbone)
    tokenizer = load_tokenizer(path)
    data = ClassificationData(cfg, tokenizer)
    data.load()
    prefix_cfg = cfg.prefix
    if prefix_cfg.router_input == "group":
        prefix_cfg = dataclasses.replace(prefix_cfg, num_groups=max(len(data.group_names), 1))
    backbone = AutoModel.from_pretrained(path)
    if cfg.model.gradient_checkpointing:
        backbone.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
    network = SequenceClassifier(backbone, data.num_classes, cfg.model, prefix_cfg)
    return tokenizer, data, network


def _init_from_training_text(network, data: ClassificationData, n: int = 256) -> None:
    batch = data._collate(data.train_set[:n])
    network.mixture.init_from_text(batch["input_ids"], batch["attention_mask"], seed=data.cfg.seed)


def count_parameters(network) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


def _trainer(cfg: RunConfig, run_dir: Path, callbacks, logger) -> L.Trainer:
    return L.Trainer(
        **cfg.trainer,
        default_root_dir=str(run_dir),
        logger=logger,
        callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()],
    )


def _loggers(run_dir: Path):
    loggers = [CSVLogger(str(run_dir), name="logs", version="")]
    try:
        import tensorboard  # noqa: F401
        from lightning.pytorch.loggers import TensorBoardLogger

        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=""))
    except ImportError:
        pass
    return loggers


def start_run(cfg: RunConfig, resume: bool) -> tuple[RunConfig, Path]:
    """Create (or reopen) the run directory, save the resolved config, seed everything."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if not resume and any((run_dir / "checkpoints").glob("*.ckpt")):
        raise ConfigError(
            f"run directory {run_dir} already holds checkpoints: continue it with --resume {run_dir}, "
            "or choose another run_dir"
        )
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / CONFIG_FILE)
    L.seed_everything(cfg.seed, verbose=False)
    return cfg, run_dir


def train_module(cfg: RunConfig, run_dir: Path, module: L.LightningModule, data, resume: bool) -> dict | None:
    """Lightning's fit with checkpoints, logs and resume; the run statistics, or None off process 0."""
    ckpt_dir = run_dir / "checkpoints"
    timer = _Timer()
    callbacks = [
        ModelCheckpoint(
            dirpath=str(ckpt_dir),
            filename="{step}",
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=1,
            monitor=None,
        ),
        _InterruptCheckpoint(dirpath=str(ckpt_dir), filename="interrupted"),
        timer,
    ]
    trainer = _trainer(cfg, run_dir, callbacks, _loggers(run_dir))
    # The frozen backbone stays in eval mode on purpose (no dropout in frozen layers); Lightning warns.
    warnings.filterwarnings("ignore", message=r"Found \d+ module\(s\) in eval mode")
    # An explicit path: given None, Lightning would look for a "last" checkpoint by itself.
    ckpt_path = _latest_checkpoint(ckpt_dir) if resume else None
    if ckpt_path:
        _set_aside_logs(run_dir / "logs")
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
    except SystemExit:  # Lightning exits after Ctrl-C, once OnExceptionCheckpoint has saved
        if (ckpt_dir / "interrupted.ckpt").is_file():
            print(f"interrupted; checkpoint saved. Continue with: python scripts/fit.py --resume {run_dir}")
            raise SystemExit(130) from None
        raise
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        # Under DDP, process 0 alone evaluates and writes the run directory; the others are done.
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()
    if not trainer.is_global_zero:
        return None
    _merge_logs(run_dir / "logs")
    return {
        "trainable_params": count_parameters(module.network),
        "train_time_s": round(getattr(timer, "seconds", float("nan")), 1),
        "steps": trainer.global_step,
    }


def fit(cfg: RunConfig, resume: bool = False) -> FitResult:
    """Train one run and write its run directory; with resume, continue from its last checkpoint."""
    if cfg.model.task == "generation":
        from .generation import fit_generation

        return fit_generation(cfg, resume)
    cfg, run_dir = start_run(cfg, resume)
    _, data, network = build(cfg)
    if cfg.prefix.init == "tokens" and network.mixture is not None and not resume:
        _init_from_training_text(network, data)
    module = TaskModule(network, cfg, data.num_classes, data.group_names)
    stats = train_module(cfg, run_dir, module, data, resume)
    if stats is None:
        return FitResult(run_dir, {})
    metrics = {**evaluate_module(module, data, cfg), **stats}
    write_run(run_dir, network, cfg, module, data, metrics)
    return FitResult(run_dir, metrics)


def _set_aside_logs(log_dir: Path) -> None:
    """Lightning's CSV logger starts a new file on resume; keep the old one to merge afterwards."""
    current = log_dir / "metrics.csv"
    if current.is_file():
        n = len(list(log_dir.glob("metrics.part*.csv")))
        current.rename(log_dir / f"metrics.part{n}.csv")


def _merge_logs(log_dir: Path) -> None:
    """One metrics.csv over all segments of a resumed run (rows a later segment redid are dropped)."""
    parts = sorted(log_dir.glob("metrics.part*.csv"), key=lambda p: int(p.stem.removeprefix("metrics.part")))
    if not parts:
        return
    segments = [list(csv.DictReader(open(p))) for p in [*parts, log_dir / "metrics.csv"] if p.is_file()]
    rows = []
    for i, segment in enumerate(segments):
        later = [int(r["step"]) for seg in segments[i + 1 :] for r in seg if r.get("step")]
        cut = min(later) if later else None
        rows += [r for r in segment if cut is None or int(r["step"]) < cut]
    header = list(dict.fromkeys(k for r in rows for k in r))
    with open(log_dir / "metrics.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=header)
        writer.writeheader()
        writer.writerows(rows)
    for p in parts:
        p.unlink()


def _latest_checkpoint(ckpt_dir: Path) -> str | None:
    """The newest of last.ckpt and a checkpoint written on Ctrl-C (or None: start over)."""
    candidates = [p for p in (ckpt_dir / "last.ckpt", ckpt_dir / "interrupted.ckpt") if p.is_file()]
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))


def evaluate_module(module: TaskModule, data: ClassificationData, cfg: RunConfig, loader=None) -> dict[str, float]:
    """One validation pass on a fresh single-device Trainer; returns the logged metrics as floats."""
    trainer = L.Trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=cfg.trainer.get("enable_progress_bar", True),
        enable_model_summary=False,
    )
    loader = loader if loader is not None else data.val_dataloader()
    results = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    return {k: round(float(v), 6) for k, v in results.items() if not math.isnan(float(v))}


def write_run(run_dir: Path, network, cfg: RunConfig, module: TaskModule, data: ClassificationData, metrics):
    """The run directory's result files: weights, metrics, per-example routing table."""
    write_weights_and_metrics(run_dir, network, cfg, metrics)
    write_routing_table(run_dir / ROUTING_FILE, module.rows, data.val_examples, cfg.prefix.num_experts)


def write_weights_and_metrics(run_dir: Path, network, cfg: RunConfig, metrics: dict) -> None:
    """adapter.safetensors (trainable tensors, with the backbone and config as metadata) and metrics.json."""
    weights = {k: v.contiguous() for k, v in trainable_state_dict(network).items()}
    meta = {"backbone": cfg.model.backbone, "method": cfg.model.method, "config": json.dumps(to_dict(cfg))}
    save_file(weights, str(run_dir / WEIGHTS_FILE), metadata=meta)
    (run_dir / METRICS_FILE).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")


def write_per_example_table(path: Path, rows: list[dict], num_experts: int, columns: list[str], cells) -> None:
    """A CSV of validation rows (sorted by index): the task's own columns, then the routing, if any."""
    routed = bool(rows) and "weights" in rows[0]
    header = columns + (["prefix_len", "experts"] + [f"w{i}" for i in range(num_experts)] if routed else [])
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        for row in sorted(rows, key=lambda r: r["index"]):
            line = cells(row)
            if routed:
                line += [f"{row['prefix_len']:.3f}", " ".join(map(str, row["experts"]))]
                line += [f"{w:.6f}" for w in row["weights"]]
            writer.writerow(line)


def write_routing_table(path: Path, rows: list[dict], examples, num_experts: int) -> None:
    """One row per validation example: id, group, label, prediction, loss, input length, routing."""

    def cells(row):
        ex = examples[row["index"]]
        return [ex.id, ex.group or "", row["label"], row["prediction"], f"{row['loss']:.6f}", row["input_len"]]

    columns = ["id", "group", "label", "prediction", "loss", "input_len"]
    write_per_example_table(path, rows, num_experts, columns, cells)


def load_network(run_dir: str | Path, cfg: RunConfig | None = None):
    """Rebuild a finished run's network with its trained weights: (cfg, data, network)."""
    from .run_config import config_from_dict

    run_dir = Path(run_dir)
    if cfg is None:
        from omegaconf import OmegaConf

        cfg = config_from_dict(OmegaConf.to_container(OmegaConf.load(run_dir / CONFIG_FILE)))
    _, data, network = build(cfg)
    weights = load_file(str(run_dir / WEIGHTS_FILE))
    check_compatible(weights, trainable_state_dict(network), _saved_backbone(run_dir), cfg.model.backbone)
    network.load_state_dict(weights, strict=False)
    return cfg, data, network


def _saved_backbone(run_dir: Path) -> str:
    from safetensors import safe_open

    with safe_open(str(run_dir / WEIGHTS_FILE), framework="pt") as f:
        return (f.metadata() or {}).get("backbone", "unknown")
