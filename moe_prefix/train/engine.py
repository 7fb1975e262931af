"""The run loop: `fit(cfg)` trains one run of any task and writes its run directory; `evaluate_run` and
`load_run` read a finished one back.

Scripts, the command line, notebooks, tests and the ablation runner all call these; there is no second
loop. A task (`classification`, `generation`) supplies data, network, validation and per-example results
(see `module.Task`); how a run starts, trains, checkpoints, resumes, validates and writes its files is
the same for both and lives here. Every check (config, sources, data, backbone) runs before anything is
written to disk.

Two faults from outside the run stop it with `RunStoppedError`, one line that names what happened, the
checkpoint a `--resume` continues from (intact: checkpoints are written atomically) and the command: a file
that cannot be written (a full disk), and a data-parallel process lost (killed, crashed, or silent for
`ddp_timeout_s`, the collective timeout set on CPU runs).
"""

from __future__ import annotations

import contextlib
import csv
import dataclasses
import errno
import logging
import math
import re
import signal
import threading
import time
import warnings
from dataclasses import dataclass
from datetime import timedelta
from pathlib import Path

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback, Checkpoint, ModelCheckpoint, ModelSummary, TQDMProgressBar
from lightning.pytorch.strategies import DDPStrategy, StrategyRegistry
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException
from lightning.pytorch.utilities.model_summary import get_human_readable_count

from . import classification, generation, trackers
from . import run_dir as rd
from .checkpointing import SafetensorsCheckpointIO, checkpoint_step
from .module import Built, NonFiniteLossError, PrefixTrainingModule, Task
from .run_config import ConfigError, RunConfig, check_sources, resolved_loggers

INTERRUPT_CHECKPOINT = "interrupted.ckpt"  # written on Ctrl-C or a crash, next to Lightning's last.ckpt
KMEANS_SAMPLE = 2048  # training inputs whose router features k-means clusters (prefix.router_init=kmeans)
TASKS: dict[str, Task] = {"classification": classification, "generation": generation}
# How gloo words a collective whose peer died (its socket closed) or hung (past the collective timeout).
PEER_LOST = re.compile(r"Connection (closed|reset) by peer|Broken pipe|[Tt]imed out|timeout")


class RunStoppedError(RuntimeError):
    """A run stopped by its surroundings (a full disk, a lost data-parallel process); --resume continues it."""


@dataclass
class FitResult:
    run_dir: Path
    metrics: dict[str, float]  # empty on a non-zero DDP process (process 0 reports)


@dataclass
class EvalResult:
    metrics: dict[str, float]
    path: Path  # the eval-<name>.json written
    name: str  # val, val-noprefix or the evaluated file's stem


def default_run_dir(cfg: RunConfig) -> Path:
    return Path("runs") / f"{cfg.name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _prepare(cfg: RunConfig) -> Task:
    """Checks that need no loading, then this process's settings (threads, seeds); returns the task."""
    check_sources(cfg)
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    L.seed_everything(cfg.seed, verbose=False)
    return TASKS[cfg.model.task]


def fit(cfg: RunConfig, resume: bool = False) -> FitResult:
    """Train one run and write its run directory; with resume, continue from its last checkpoint."""
    run_dir = Path(cfg.run_dir) if cfg.run_dir else default_run_dir(cfg)
    cfg = dataclasses.replace(cfg, run_dir=str(run_dir))
    if not resume and rd.has_checkpoints(run_dir):
        raise ConfigError(
            f"run directory {run_dir} already holds checkpoints: continue it with --resume {run_dir}, "
            "or choose another run_dir"
        )
    task = _prepare(cfg)
    logger_names = resolved_loggers(cfg.trainer)  # a tracker missing here fails now, before anything loads
    init_from = cfg.model.init_from
    if init_from and not (Path(init_from) / rd.WEIGHTS_FILE).is_file():
        raise ConfigError(f"model.init_from={init_from!r} is not a finished run directory (no {rd.WEIGHTS_FILE})")
    # A --resume that finds no checkpoint (the run stopped before its first) starts the run as a fresh one would.
    resume = resume and _latest_checkpoint(run_dir / rd.CHECKPOINT_DIR) is not None
    built = task.build(cfg)
    upcycle = cfg.model.method == "prefix" and cfg.prefix.expert_init == "upcycle"
    if init_from and not resume:  # starts from another run's trained weights (e.g. SFT, then prefix_rft)
        if upcycle:  # a one-expert run's prefix becomes every expert; the router starts fresh below
            rd.upcycle_weights(init_from, built.network, cfg)
        else:
            rd.load_weights(init_from, built.network, cfg)
    try:
        return _fit_built(cfg, task, built, run_dir, resume, upcycle, logger_names)
    except OSError as err:  # every check has passed: the file system failed (ENOSPC: a full disk)
        raise RunStoppedError(f"run stopped: {_os_failure(err, run_dir)}; {_resume_hint(run_dir, err)}") from err


def _fit_built(
    cfg: RunConfig, task: Task, built: Built, run_dir: Path, resume: bool, upcycle: bool, logger_names: list[str]
) -> FitResult:
    rd.create(cfg, run_dir)  # the data and the backbone loaded: nothing is written for a failed check
    mixture = built.network.mixture
    init_from = cfg.model.init_from
    if mixture is not None and not resume and (not init_from or upcycle):  # a resumed run has them in its checkpoint
        if cfg.prefix.init == "tokens" and not upcycle:
            batch = built.data.first_training_batch(task.INIT_SEQUENCES)
            mixture.init_from_text(batch["input_ids"], batch["attention_mask"], seed=cfg.seed)
        if cfg.prefix.router_init == "kmeans":
            mixture.init_router_kmeans(built.data.router_sample(KMEANS_SAMPLE, cfg.seed), seed=cfg.seed)
    module = task.make_module(built, cfg)
    loggers = trackers.make_loggers(cfg, run_dir, logger_names)
    if cfg.model.method == "none":  # nothing trains (checked: generation only): the backbone as shipped is validated
        stats = {"trainable_params": count_parameters(built.network), "steps": 0, "train_time_s": 0.0}
    else:
        stats = _train(cfg, run_dir, module, built.data, resume, loggers)
    if stats is None:
        return FitResult(run_dir, {})
    metrics = {**validate(module, built.data.val_dataloader(), cfg), **stats}
    rd.write_weights(run_dir, built.network, cfg)
    task.write_results(run_dir, module, built, None)
    rd.write_json(run_dir / rd.METRICS_FILE, metrics)  # last: metrics.json marks the run finished
    final = rd.read_metrics(run_dir)
    trackers.send_final_metrics(loggers, final, stats["steps"])
    return FitResult(run_dir, final)


def _os_failure(err: OSError, run_dir: Path) -> str:
    """What failed: the file (a write inside Lightning's loggers may not name it) and the system's reason."""
    return f"writing {err.filename or f'into {run_dir}'} failed ({err.strerror or err})"


def _resume_hint(run_dir: Path, err: BaseException | None = None) -> str:
    """The checkpoint a --resume continues from (written atomically, so intact) and the command."""
    if not (run_dir / rd.CONFIG_FILE).is_file():
        return "nothing was trained yet; start the run again"
    ckpt = _latest_checkpoint(run_dir / rd.CHECKPOINT_DIR)
    step = checkpoint_step(ckpt) if ckpt else None
    at = f" (step {step})" if step is not None else ""
    earlier = "the earlier " if ckpt and getattr(err, "filename", None) == ckpt else ""  # its rewrite failed
    kept = f"the last good checkpoint, {earlier}{ckpt}{at}, is intact" if ckpt else "no checkpoint had been saved yet"
    full = isinstance(err, OSError) and err.errno in (errno.ENOSPC, errno.EDQUOT)
    return f"{kept}; {'free some space, then ' if full else ''}continue with: moe-prefix fit --resume {run_dir}"


def _peer_lost(err: BaseException, world_size: int) -> bool:
    """A collective failed because another process of a data-parallel run died or stopped answering."""
    if world_size < 2 or not isinstance(err, RuntimeError):
        return False
    return isinstance(err, torch.distributed.DistError) or PEER_LOST.search(str(err)) is not None


def _peer_failure(err: BaseException, rank: int, world_size: int, timeout_s: float) -> str:
    """Which process stopped, as far as this one can tell (gloo names an address, not a rank)."""
    who = f"process {1 - rank} of 2" if world_size == 2 else f"another of the {world_size} processes"
    if re.search(r"[Tt]imed out|timeout", str(err)):
        return f"data-parallel {who} stopped answering (no reply within ddp_timeout_s={timeout_s:g} s)"
    return f"data-parallel {who} stopped (its connection closed: killed or crashed)"


def load_run(run_dir: str | Path, cfg: RunConfig | None = None, prefix: bool = True) -> tuple[RunConfig, Built]:
    """A finished run's config and its rebuilt tokenizer, data and network with the trained weights.

    prefix=False: the bare backbone of the run's config instead (tasks with HAS_ZERO_SHOT only).
    """
    cfg = cfg if cfg is not None else rd.read_config(run_dir)
    task = _prepare(cfg)
    if not prefix and not task.HAS_ZERO_SHOT:
        raise ConfigError(f"--no-prefix applies to generation runs only; {run_dir} is a {cfg.model.task} run")
    built = task.build(cfg, prefix=prefix)
    if prefix and cfg.model.method != "none":  # a run that trained nothing left an empty adapter (and
        # safetensors before 0.5 cannot read a file without tensors)
        rd.load_weights(run_dir, built.network, cfg)
    return cfg, built


def evaluate_run(run_dir: str | Path, data_file: str | None = None, no_prefix: bool = False) -> EvalResult:
    """Validate a finished run again: on its split, on another file (data_file), or its bare backbone
    (no_prefix). Writes eval-<name>.json and the task's per-example results for that name."""
    run_dir = Path(run_dir)
    cfg = rd.read_config(run_dir)
    task = TASKS[cfg.model.task]
    if data_file and not task.EVALUATES_OTHER_FILES:
        raise ConfigError(f"--data is not supported for {cfg.model.task} runs; they evaluate on their validation split")
    cfg, built = load_run(run_dir, cfg, prefix=not no_prefix)
    module = task.make_module(built, cfg)
    loader, name = task.eval_loader(built, data_file)
    name += "-noprefix" if no_prefix else ""
    metrics = validate(module, loader, cfg)
    path = run_dir / rd.eval_file(name)
    rd.write_json(path, metrics)
    task.write_results(run_dir, module, built, name)
    return EvalResult(metrics, path, name)


# -- Lightning ----------------------------------------------------------------------------------------


class _InterruptCheckpoint(Checkpoint):
    """Save on Ctrl-C or a crash, but never a state that just produced a non-finite loss.

    Not Lightning's OnExceptionCheckpoint: with that one present, Lightning turns `fit(ckpt_path=None)`
    into a search for a "last" checkpoint and warns twice on every fresh run. We pass the checkpoint
    to resume from explicitly (`_latest_checkpoint`), so that search is not wanted.
    """

    def __init__(self, path: Path):
        self.path = path

    def on_exception(self, trainer, pl_module, exception):
        # Not after a failed write (the disk is full) or a lost peer (saving waits on every process): the
        # last periodic checkpoint stands, a state between two steps.
        if isinstance(exception, (NonFiniteLossError, OSError)) or _peer_lost(exception, trainer.world_size):
            return
        trainer.save_checkpoint(self.path)

    def teardown(self, trainer, pl_module, stage):
        # A run that ends normally leaves no stale interrupt checkpoint for a later --resume to pick up.
        trainer.strategy.remove_checkpoint(self.path)


class _StopAtStepEnd(Callback):
    """Ctrl-C and SIGTERM stop a single-process run at the end of the training step under way, where the
    interrupt checkpoint holds the state a periodic checkpoint holds and a resume continues exactly.

    Lightning's own handling does not: SIGINT raises KeyboardInterrupt wherever the run is, and SIGTERM
    stops at the next of several checks, one of them just after an epoch is counted done. A checkpoint
    saved there makes the resumed run skip the next epoch: the data order shifts by an epoch and the final
    metrics differ (tests/test_interrupts.py sends each signal in a step and at an epoch's end).

    A second Ctrl-C stops at once, as Python's default does. Under data parallelism the processes would
    have to agree on the step, so Lightning's handling stays.
    """

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self):
        self.received: int | None = None
        self.replaced: dict[int, object] = {}

    def _on_signal(self, signum, frame):
        if signum == signal.SIGINT and self.received is not None:
            raise KeyboardInterrupt  # asked twice: stop now, mid-step if need be
        self.received = signum
        again = " (Ctrl-C again stops at once)" if signum == signal.SIGINT else ""
        rank_zero_info(f"\n{signal.Signals(signum).name} received: stopping after the training step under way{again}")

    def on_train_start(self, trainer, pl_module):
        # Signal handlers can only be set from the main thread (not in a notebook's worker thread).
        if trainer.world_size > 1 or threading.current_thread() is not threading.main_thread():
            return
        for signum in self.SIGNALS:
            self.replaced[signum] = signal.signal(signum, self._on_signal)

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if self.received == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received == signal.SIGTERM:
            raise SIGTERMException

    def teardown(self, trainer, pl_module, stage):
        for signum, handler in self.replaced.items():
            if signal.getsignal(signum) == self._on_signal:  # not if Lightning restored its originals already
                signal.signal(signum, handler)
        self.replaced = {}


class _OwnPeerLoss(Callback):
    """CPU DDP: process 0 reports a lost process itself, so Lightning's watcher of the processes it started
    must not SIGKILL it first (it does within 5 s of a child's death, leaving no word of what happened).

    gloo's closed connection (a killed process) and ddp_timeout_s (a hung one) stop process 0 instead, and
    `_train` then stops the remaining children. Lightning names the watcher thread; emptying its list ends it.
    """

    def setup(self, trainer, pl_module, stage):
        for thread in threading.enumerate():
            if thread.name == "child-process-observer" and hasattr(thread, "_child_processes"):
                thread._child_processes = []


class _Timer(Callback):
    """Wall time of training proper (excludes loading and the final evaluation), over every attempt of a run.

    The seconds trained so far travel in each checkpoint, so a resumed run reports the time of the whole
    training, not only of its last attempt (time after the checkpoint it resumes from is not counted twice:
    those steps are trained again and timed then)."""

    def __init__(self):
        self.before = 0.0  # seconds of earlier attempts, restored from the checkpoint before on_train_start
        self.start: float | None = None

    def _elapsed(self) -> float:
        return self.before + (time.perf_counter() - self.start if self.start is not None else 0.0)

    def on_train_start(self, trainer, pl_module):
        self.start = time.perf_counter()

    def on_train_end(self, trainer, pl_module):
        self.seconds = self._elapsed()

    def state_dict(self) -> dict:
        return {"seconds": self._elapsed()}

    def load_state_dict(self, state_dict: dict) -> None:
        self.before = float(state_dict["seconds"])


# Warnings that say nothing a user can act on: (message pattern, category).
_IGNORED_WARNINGS = (
    # The frozen backbone stays in eval mode on purpose (no dropout in frozen layers).
    (r"Found \d+ module\(s\) in eval mode", Warning),
    # Raised inside Lightning's own use of torch's pytree helpers, not by anything a run configures.
    (r".*LeafSpec.*is deprecated", FutureWarning),
    (r".*LeafSpec.*is deprecated", DeprecationWarning),
    # A resumed run reopens its own checkpoint folder, and our sampler skips what the run already saw
    # (datamodule.EpochSampler), which Lightning cannot know: both warnings describe a problem we do not have.
    (r"Checkpoint directory .* exists and is not empty", Warning),
    (r"You're resuming from a checkpoint that ended before the epoch ended", Warning),
    # On resume the old metrics.csv is set aside first and merged back afterwards (_merge_logs).
    (r"Experiment logs directory .* exists and is not empty", Warning),
    # The default of Lightning's worker advice assumes a GPU box; data.num_workers is documented.
    (r".*does not have many workers which may be a bottleneck", Warning),
)


def _quiet_lightning() -> None:
    """Silence what a user cannot act on; warnings about their run (truncation, collapse) stay."""
    present = {(f[1].pattern, f[2]) for f in warnings.filters if f[0] == "ignore" and f[1] is not None}
    for message, category in _IGNORED_WARNINGS:
        # Only what is missing: any change to the filters lets every warning already shown show again (each
        # fit makes two Trainers, and a routing collapse warned about once would be printed twice).
        if (message, category) not in present:
            warnings.filterwarnings("ignore", message=message, category=category)
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        logger = logging.getLogger(name)
        if not any(isinstance(f, _NoNoise) for f in logger.filters):
            logger.addFilter(_NoNoise())


class _NoNoise(logging.Filter):
    """Lightning's lines that say nothing about this run: tips about optional packages (adverts); the
    accelerator inventory, printed again by every Trainer (each fit makes two, the config names the device,
    and Lightning still warns when a GPU sits unused); how it counts the schedule's steps."""

    NOISE = ("Tip:", "GPU available:", "TPU available:", "HPU available:", "Loading `train_dataloader` to estimate")

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        return not any(part in message for part in self.NOISE)


class _ModelSummary(ModelSummary):
    """Lightning's summary without its FLOPs column and total: they read 0 unless a module defines
    `example_input_array`, and a tokenised batch is not one example tensor."""

    @staticmethod
    def summarize(
        summary_data, total_parameters, trainable_parameters, model_size, total_training_modes, total_flops=0, **kwargs
    ) -> None:  # Lightning before 2.5 passes no total_flops (and has no FLOPs column)
        columns = [(name, [str(v) for v in values]) for name, values in summary_data if name != "FLOPs"]
        widths = [max([len(name), *map(len, values)]) for name, values in columns]
        lines = [" | ".join(name.ljust(w) for (name, _), w in zip(columns, widths, strict=True))]
        for row in zip(*(values for _, values in columns), strict=True):
            lines.append(" | ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)))
        trainable, frozen = (
            get_human_readable_count(n) for n in (trainable_parameters, total_parameters - trainable_parameters)
        )
        lines.append(f"trainable params: {trainable}, frozen: {frozen} ({model_size:.1f} MB in all)")
        rank_zero_info("\n".join(lines))


def _trainer(**kwargs) -> L.Trainer:
    """The one place a Lightning Trainer is configured (training with cfg.trainer, or one validation)."""
    _quiet_lightning()
    return L.Trainer(**kwargs)


def _gpu_progress_bar(cfg: RunConfig) -> list[Callback]:
    """On a GPU, a bar that redraws once per log interval: each redraw reads the loss on the host (a sync)."""
    trainer = cfg.trainer
    if not trainer.get("enable_progress_bar", True) or trainer.get("accelerator") == "cpu":
        return []
    if not torch.cuda.is_available():
        return []
    return [TQDMProgressBar(refresh_rate=max(1, int(trainer.get("log_every_n_steps") or 1)))]


def _strategy(cfg: RunConfig) -> dict:
    """trainer.strategy=ddp (or another DDP name) on the CPU: the same strategy, with ddp_timeout_s as the
    gloo collective timeout instead of Lightning's 30 minutes, so that a hung process stops the run soon."""
    name = cfg.trainer.get("strategy")
    accelerator = cfg.trainer.get("accelerator", "auto")
    on_cpu = accelerator == "cpu" or (accelerator == "auto" and not torch.cuda.is_available())
    if not isinstance(name, str) or name not in StrategyRegistry or not on_cpu:
        return {}
    entry = StrategyRegistry[name]
    if not issubclass(entry["strategy"], DDPStrategy):
        return {}
    return {"strategy": entry["strategy"](**entry["init_params"], timeout=timedelta(seconds=cfg.ddp_timeout_s))}


def _train(cfg: RunConfig, run_dir: Path, module: PrefixTrainingModule, data, resume: bool, loggers) -> dict | None:
    """Lightning's fit with checkpoints, logs and resume; the run statistics, or None off process 0."""
    ckpt_dir = run_dir / rd.CHECKPOINT_DIR
    timer = _Timer()
    strategy = _strategy(cfg)
    callbacks = [
        ModelCheckpoint(
            dirpath=str(ckpt_dir),
            filename="{step}",
            every_n_train_steps=cfg.checkpoint_every_n_steps,
            save_last=True,
            save_top_k=1,
            monitor=None,
        ),
        _InterruptCheckpoint(ckpt_dir / INTERRUPT_CHECKPOINT),
        _StopAtStepEnd(),
        timer,
        trackers.SendConfig(cfg, run_dir),
        *_gpu_progress_bar(cfg),
        *([_OwnPeerLoss()] if strategy else []),
    ]
    lightning_args = {k: v for k, v in cfg.trainer.items() if k != "loggers"}  # ours, not a Trainer argument
    if lightning_args.pop("enable_model_summary", True):
        callbacks.append(_ModelSummary())
    trainer = _trainer(
        **{**lightning_args, **strategy},
        enable_model_summary=False,  # Lightning's own; _ModelSummary replaces it
        default_root_dir=str(run_dir),
        logger=loggers,
        callbacks=callbacks,
        plugins=[SafetensorsCheckpointIO()],
    )
    ckpt_path = _latest_checkpoint(ckpt_dir) if resume else None
    if ckpt_path:
        _set_aside_logs(run_dir / rd.LOG_DIR)
    try:
        trainer.fit(module, datamodule=data, ckpt_path=ckpt_path)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            # Under DDP, process 0 alone evaluates and writes the run directory; the others are done.
            torch.distributed.barrier()
            torch.distributed.destroy_process_group()
    except SystemExit:  # Lightning exits after Ctrl-C or SIGTERM, once _InterruptCheckpoint has saved
        if (ckpt_dir / INTERRUPT_CHECKPOINT).is_file():
            print(f"interrupted; checkpoint saved. Continue with --resume {run_dir}")
            raise SystemExit(130) from None
        raise
    except RuntimeError as err:
        if not _peer_lost(err, trainer.world_size):
            raise
        # Process 0 started the others: a hung one would otherwise outlive the run.
        kill = getattr(trainer.strategy.launcher, "kill", None)
        if trainer.global_rank == 0 and kill is not None:
            kill(signal.SIGKILL)
        if torch.distributed.is_initialized():  # else the broken group's teardown holds the exit for seconds
            with contextlib.suppress(RuntimeError):
                torch.distributed.destroy_process_group()
        failure = _peer_failure(err, trainer.global_rank, trainer.world_size, cfg.ddp_timeout_s)
        raise RunStoppedError(f"run stopped: {failure}; {_resume_hint(run_dir)}") from err
    if not trainer.is_global_zero:
        return None
    _merge_logs(run_dir / rd.LOG_DIR)
    stats = {"trainable_params": count_parameters(module.network), "steps": trainer.global_step}
    if hasattr(timer, "seconds"):  # absent when a resumed run had nothing left to train
        stats["train_time_s"] = round(timer.seconds, 1)
    return stats


def validate(module: PrefixTrainingModule, loader, cfg: RunConfig) -> dict[str, float]:
    """One validation pass on a fresh single-device Trainer; returns the logged metrics as floats."""
    trainer = _trainer(
        accelerator=cfg.trainer.get("accelerator", "auto"),
        devices=1,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=cfg.trainer.get("enable_progress_bar", True),
        enable_model_summary=False,
    )
    results = trainer.validate(module, dataloaders=loader, verbose=False)[0]
    return {k: round(float(v), 6) for k, v in results.items() if not math.isnan(float(v))}


def count_parameters(network) -> int:
    return sum(p.numel() for p in network.parameters() if p.requires_grad)


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
    candidates = [p for p in (ckpt_dir / "last.ckpt", ckpt_dir / INTERRUPT_CHECKPOINT) if p.is_file()]
    if not candidates:
        return None
    return str(max(candidates, key=lambda p: p.stat().st_mtime))
