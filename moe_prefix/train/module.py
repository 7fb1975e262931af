"""The LightningModule every task shares: seeds per step, routing statistics, optimiser, checkpoints.

A task (classification, generation) subclasses `PrefixTrainingModule` with its `model_step` and its
validation; everything else about training is here, once. Validation rows that carry routing
(`weights`, `experts`, `prefix_len`) are summarised by `routing_metrics`, the same way for every task.

Axes: b - batch, e - experts, k - banks per input.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any, NamedTuple, Protocol

import lightning as L
import numpy as np
import torch
import torch.nn.functional as F
from torchmetrics import MeanMetric

from moe_prefix.analysis.routing_stats import dead_expert_count, normalized_mutual_info
from moe_prefix.router import detect_collapse

from .checkpointing import check_compatible
from .datamodule import TrainData
from .networks import trainable_state_dict
from .run_config import RunConfig


class NonFiniteLossError(RuntimeError):
    """Training produced a NaN or infinite loss; the last good checkpoint is kept."""


def _host_reads_are_free(device: torch.device) -> bool:
    """Reading a tensor's value on the host waits for its device: free on the CPU, a stall of a GPU's queue."""
    return device.type == "cpu"


def routing_summary(weights: torch.Tensor, indices: torch.Tensor, num_experts: int) -> dict[str, torch.Tensor]:
    """Mean per-example routing entropy (nats) and each expert's share of routing slots.

    weights (b e), indices (b k) -> entropy (), load (e).
    """
    w = weights.float().clamp_min(1e-12)
    entropy = -(weights.float() * w.log()).sum(-1).mean()
    load = F.one_hot(indices, num_experts).float().sum((0, 1)) / indices.numel()
    return {"entropy": entropy, "load": load}


def routing_metrics(rows: list[dict], num_experts: int, prefix: str = "val") -> dict[str, float]:
    """Routing statistics of validation rows; warns on a collapse. Empty when the rows carry no routing.

    Slot counts (`load`) cannot show a collapse under top-k > 1 (no expert fills more than 1/k of the
    slots); the mean routing weight (`weight`), each expert's share of the prefix, can. An expert is dead
    when its share is below 1/(4E). Where rows carry a group (>= 0), `nmi` is the normalised mutual
    information between each example's top-1 expert and its group.
    """
    if not rows or "weights" not in rows[0]:
        return {}
    weights = torch.tensor([r["weights"] for r in rows])
    experts = torch.tensor([r["experts"] for r in rows])
    summary = routing_summary(weights, experts, num_experts)
    share = weights.float().mean(0)
    metrics = {
        f"{prefix}/router_entropy": float(summary["entropy"]),
        f"{prefix}/prefix_len": sum(r["prefix_len"] for r in rows) / len(rows),
        f"{prefix}/dead_experts": dead_expert_count(share),
    }
    for i, (load, weight) in enumerate(zip(summary["load"], share, strict=True)):
        metrics[f"{prefix}/load/e{i}"] = float(load)
        metrics[f"{prefix}/weight/e{i}"] = float(weight)
    grouped = [
        (r["group"], w) for r, w in zip(rows, weights.argmax(1).tolist(), strict=True) if r.get("group", -1) >= 0
    ]
    if grouped:
        groups, top1 = zip(*grouped, strict=True)
        metrics[f"{prefix}/nmi"] = normalized_mutual_info(np.array(top1), np.array(groups))
    collapse = num_experts > 1 and detect_collapse(share.numpy())
    if collapse:
        warnings.warn(
            f"routing collapse: expert {collapse.expert} takes {collapse.share:.0%} of the load; "
            "raise prefix.balance_coef or prefix.router_noise",
            stacklevel=1,
        )
    return metrics


def routing_row(routing, i: int) -> dict:
    """Example i's routing, as stored in validation rows (nothing when the network has no mixture)."""
    if routing is None:
        return {}
    return {
        "weights": routing.weights[i].tolist(),
        "experts": routing.indices[i].tolist(),
        "prefix_len": float(routing.lengths[i]),
    }


class Built(NamedTuple):
    """What a task builds from a config: tokenizer, loaded data and the network (backbone + method)."""

    tokenizer: Any
    data: TrainData
    network: torch.nn.Module


class Task(Protocol):
    """A task of the run loop (`engine.fit`, `engine.evaluate_run`): data, head and results differ, the
    loop does not. `classification` and `generation` are the two implementations."""

    INIT_SEQUENCES: int  # training sequences whose keys/values seed the banks (prefix.init=tokens)
    EVALUATES_OTHER_FILES: bool  # evaluation accepts another data file
    HAS_ZERO_SHOT: bool  # the bare backbone can be evaluated (no prefix)

    def build(self, cfg: RunConfig, prefix: bool = True) -> Built:
        """Tokenizer, data and network; prefix=False: the bare frozen backbone (where HAS_ZERO_SHOT)."""

    def make_module(self, built: Built, cfg: RunConfig) -> PrefixTrainingModule: ...

    def eval_loader(self, built: Built, data_file: str | None) -> tuple[Any, str]:
        """Validation loader(s) and the evaluation's name: the run's own split, or another file."""

    def write_results(self, run_dir: Path, module: PrefixTrainingModule, built: Built, name: str | None) -> None:
        """The per-example outputs of a validation: of the fit (name None) or of a named evaluation."""


class PrefixTrainingModule(L.LightningModule):
    """What every task shares: per-step seeds, logged routing statistics, the optimiser and schedule,
    and checkpoints that hold only trainable tensors. Subclasses define `model_step(batch)` (per-example
    losses (b) and the network output) and validation, and collect one dict per validated example in
    `self.rows` (the run directory's per-example table)."""

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
        logs_now = self._logs_this_step()
        if out.routing is not None:
            r = out.routing
            total = loss + r.aux_loss
        if out.routing is not None and logs_now:
            # Only on the steps whose logs Lightning writes: in between, no logger would see these values, and
            # under DDP each would cost an all-reduce.
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
        if _host_reads_are_free(total.device):  # then check now: stop before a bad step reaches the optimiser
            if not torch.isfinite(total):
                self._raise_non_finite(self.global_step, total.item())
        else:
            # On a GPU, reading the loss on the host each step would stall the queue of kernels: remember the
            # first bad step on the device, and look when the host waits anyway (log steps, checkpoints, the end).
            step = torch.full((), self.global_step, device=total.device)
            first = getattr(self, "_first_bad_step", None)
            first = torch.full_like(step, -1) if first is None else first
            self._first_bad_step = torch.where((first < 0) & ~torch.isfinite(total.detach()), step, first)
            if logs_now:
                self._check_finite()
        return total

    def _logs_this_step(self) -> bool:
        """Whether Lightning writes this training step's logs (the test Lightning's own monitors use)."""
        trainer = self._trainer
        return trainer is None or bool(trainer.fast_dev_run) or trainer._logger_connector.should_update_logs

    def _check_finite(self) -> None:
        """Raise if a step since the last look had a non-finite loss (GPU runs; see training_step)."""
        first = getattr(self, "_first_bad_step", None)
        if first is not None and int(first) >= 0:
            self._raise_non_finite(int(first))

    def _raise_non_finite(self, step: int, value: float | None = None) -> None:
        shown = "" if value is None else f" {value}"
        raise NonFiniteLossError(
            f"non-finite loss{shown} at step {step}; the last good checkpoint is kept. "
            "Lower optim.lr or check the data."
        )

    def on_train_end(self):
        self._check_finite()

    def on_validation_epoch_start(self):
        self.rows = []

    def configure_optimizers(self):
        o = self.cfg.optim
        # Groups: prefix side (lr), a new task head (head_lr), the router (router_lr); empty ones dropped.
        groups = [{"params": [], "lr": lr} for lr in (o.lr, o.head_lr or o.lr, o.router_lr or o.lr)]
        for name, param in self.network.named_parameters():
            if param.requires_grad:
                part = 1 if name.startswith("head.") else 2 if ".router." in f".{name}" else 0
                groups[part]["params"].append(param)
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
        self._check_finite()  # never keep a state a non-finite step produced as the last good checkpoint
        trainable = {f"network.{k}" for k in trainable_state_dict(self.network)}
        checkpoint["state_dict"] = {k: v for k, v in checkpoint["state_dict"].items() if k in trainable}
        checkpoint["moe_prefix"] = {"backbone": self.cfg.model.backbone, "method": self.cfg.model.method}

    def on_load_checkpoint(self, checkpoint):
        expected = {f"network.{k}": v for k, v in trainable_state_dict(self.network).items()}
        saved_model = checkpoint.get("moe_prefix", {}).get("backbone", "unknown")
        check_compatible(checkpoint["state_dict"], expected, saved_model, self.cfg.model.backbone)
