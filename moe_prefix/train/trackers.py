"""Experiment trackers: the Lightning loggers a fit writes to (`trainer.loggers`), and what each one receives.

csv is always on: `logs/metrics.csv` is what analysis and the ablation runner read back. tensorboard writes
into the run directory. wandb and mlflow file the run where a lab keeps its sweeps: under the run's name,
with its resolved config, every logged step and, once the final validation has run, the final metrics (those
of metrics.json); a sweep's runs share a W&B group and an MLflow experiment (`tracking.group`) and carry arm
and seed as tags. Both work without a network: with WANDB_MODE=offline the W&B run stays in RUN_DIR/wandb
(`wandb sync` uploads it later); MLflow writes to any tracking URI (`tracking.mlflow_uri`;
in a `file:` store, whose files cannot hold both `val/acc` and `val/acc/<group>`, metric keys read `val.acc`).

A resumed run continues its W&B and MLflow runs rather than opening new ones: their ids are kept in
RUN_DIR/trackers.json.
"""

from __future__ import annotations

import json
from pathlib import Path
from urllib.parse import urlparse

from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, Logger, MLFlowLogger, TensorBoardLogger, WandbLogger

from . import run_dir as rd
from .run_config import RunConfig, to_dict

IDS_FILE = "trackers.json"


def run_name(cfg: RunConfig) -> str:
    """The name a tracker shows: the config's name (a sweep's arm) and the seed."""
    return f"{cfg.name}-seed{cfg.seed}"


def make_loggers(cfg: RunConfig, run_dir: Path, names: list[str]) -> list[Logger]:
    """The loggers of `names` (checked by run_config.check_loggers); csv first."""
    ids = _read_ids(run_dir)
    track = cfg.tracking
    tags = {str(k): str(v) for k, v in track.tags.items()}
    loggers: list[Logger] = [CSVLogger(str(run_dir), name=rd.LOG_DIR, version="")]
    if "tensorboard" in names:
        loggers.append(TensorBoardLogger(str(run_dir), name="tensorboard", version=""))
    if "wandb" in names:
        loggers.append(
            WandbLogger(
                name=run_name(cfg),
                project=track.project,
                save_dir=str(run_dir),
                id=ids.get("wandb"),  # None: a new run; else resumed (Lightning passes resume="allow")
                group=track.group,
                tags=[f"{k}={v}" for k, v in tags.items()],  # W&B tags are plain strings
            )
        )
    if "mlflow" in names:
        import mlflow

        loggers.append(
            _MLFlowLogger(
                experiment_name=track.group or track.project,
                run_name=run_name(cfg),
                # Lightning's own default is a ./mlruns file store, which MLflow 3 refuses unless asked;
                # MLflow's default honours MLFLOW_TRACKING_URI and otherwise picks its current backend.
                tracking_uri=track.mlflow_uri or mlflow.get_tracking_uri(),
                tags=tags,
                run_id=ids.get("mlflow"),
            )
        )
    return loggers


class _MLFlowLogger(MLFlowLogger):
    """MLflow's file store keeps each metric in a file named by its key, so `val/acc` (a file) and
    `val/acc/<group>` (a file in a folder of that name) cannot both exist: there, `/` becomes `.`."""

    def __init__(self, tracking_uri: str, **kwargs):
        super().__init__(tracking_uri=tracking_uri, **kwargs)
        self.file_store = urlparse(tracking_uri).scheme in ("", "file")

    def log_metrics(self, metrics, step=None):
        if self.file_store:
            metrics = {k.replace("/", "."): v for k, v in metrics.items()}
        super().log_metrics(metrics, step)


class SendConfig(Callback):
    """At the start of training (process 0 only), the resolved config to every tracker, and their run ids
    to trackers.json so a resumed run continues the same tracker runs."""

    def __init__(self, cfg: RunConfig, run_dir: Path):
        self.cfg = cfg
        self.run_dir = run_dir

    def on_fit_start(self, trainer, pl_module):
        if not trainer.is_global_zero:
            return
        trackers = [lg for lg in trainer.loggers if not isinstance(lg, CSVLogger)]  # config.yaml holds it already
        for logger in trackers:
            logger.log_hyperparams(to_dict(self.cfg))
        ids = {}
        for logger in trackers:
            if isinstance(logger, WandbLogger):
                ids["wandb"] = logger.experiment.id
            elif isinstance(logger, MLFlowLogger):
                ids["mlflow"] = logger.run_id
        if ids:
            (self.run_dir / IDS_FILE).write_text(json.dumps(ids, indent=2) + "\n")


def send_final_metrics(loggers: list[Logger], metrics: dict[str, float], step: int) -> None:
    """The run's final metrics (after the final validation) to every tracker, then close the tracker runs."""
    for logger in loggers:
        if isinstance(logger, CSVLogger):  # metrics.json holds them
            continue
        logger.log_metrics({k: float(v) for k, v in metrics.items()}, step=step)
        if isinstance(logger, WandbLogger):
            logger.experiment.finish()  # Lightning leaves the W&B run open; finishing writes its summary
        else:
            logger.finalize("success")


def _read_ids(run_dir: Path) -> dict[str, str]:
    path = Path(run_dir) / IDS_FILE
    return json.loads(path.read_text()) if path.is_file() else {}
