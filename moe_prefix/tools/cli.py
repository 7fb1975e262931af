"""What the scripts share: turning expected errors into one line and an exit code, not a traceback."""

from __future__ import annotations

import sys
from pathlib import Path

from moe_prefix.train.run_config import ConfigError, config_from_dict, load_config

EXIT_USAGE = 2


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input, reported in one line."""
    from moe_prefix.train.assets import AssetError
    from moe_prefix.train.checkpointing import CheckpointError
    from moe_prefix.train.data import DataError
    from moe_prefix.train.engine import NonFiniteLossError

    return (ConfigError, DataError, AssetError, CheckpointError, NonFiniteLossError, FileNotFoundError)


def run_cli(command, *args) -> int:
    try:
        return command(*args) or 0
    except expected_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def load_run_config(run_dir: str | Path):
    from omegaconf import OmegaConf

    path = Path(run_dir) / "config.yaml"
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no config.yaml)")
    return config_from_dict(OmegaConf.to_container(OmegaConf.load(path)))


SHOWN_METRICS = ("val/loss", "val/f1", "val/bleu", "val/rougeL")


def _shown(key: str) -> bool:
    """The metrics the scripts print (all of them go to the run directory)."""
    return key.startswith("val/acc") or key in SHOWN_METRICS


def fit_command(config: str | None, overrides: list[str], resume: str | None) -> int:
    if resume:
        if config:
            raise ConfigError("use either --config or --resume RUN_DIR (the run directory holds its config)")
        cfg = load_run_config(resume)
        if overrides:
            raise ConfigError("--resume continues a run as configured; overrides are not accepted")
    else:
        cfg = load_config(config, overrides)
    from moe_prefix.train.engine import fit

    result = fit(cfg, resume=bool(resume))
    if not result.metrics:  # a non-zero DDP process: process 0 reports
        return 0
    shown = {k: v for k, v in result.metrics.items() if _shown(k)}
    for key, value in sorted(shown.items()):
        print(f"{key}: {value:.4f}")
    print(
        f"trainable parameters: {result.metrics['trainable_params']:,}; "
        f"training time: {result.metrics['train_time_s']} s"
    )
    print(f"run directory: {result.run_dir}")
    return 0


def evaluate_command(run_dir: str, data_file: str | None, no_prefix: bool = False) -> int:
    """Evaluate a saved run on its validation split, or on another file with the same columns.

    no_prefix (generation runs): score the bare backbone on the run's split and prompts instead.
    """
    import json

    from moe_prefix.train import data as data_io
    from moe_prefix.train.engine import TaskModule, evaluate_module, load_network

    cfg = load_run_config(run_dir)
    if cfg.model.task == "generation":
        return _evaluate_generation_command(run_dir, data_file, no_prefix)
    if no_prefix:
        raise ConfigError("--no-prefix applies to generation runs only (a classifier needs its trained head)")
    cfg, data, network = load_network(run_dir, cfg)
    module = TaskModule(network, cfg, data.num_classes, data.group_names)
    loader, name = None, "val"
    if data_file:
        d = cfg.data
        examples = data_io.load_examples(data_file, d.text_column, d.label_column, d.group_column)
        data_io.check_labels(data.train_examples, examples)
        loader, name = data.eval_loader(data.encode_examples(examples)), Path(data_file).stem
    metrics = evaluate_module(module, data, cfg, loader)
    out = Path(run_dir) / f"eval-{name}.json"
    out.write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    for key, value in sorted(metrics.items()):
        if key.startswith("val/acc") or key in ("val/loss", "val/f1"):
            print(f"{key}: {value:.4f}")
    print(f"metrics written to {out}")
    return 0


def _evaluate_generation_command(run_dir: str, data_file: str | None, no_prefix: bool) -> int:
    from moe_prefix.train.generation import evaluate_generation

    if data_file:
        raise ConfigError("--data is not supported for generation runs; they evaluate on their validation split")
    metrics = evaluate_generation(run_dir, no_prefix=no_prefix)
    for key, value in sorted(metrics.items()):
        if _shown(key):
            print(f"{key}: {value:.4f}")
    name = "val-noprefix" if no_prefix else "val"
    run = Path(run_dir)
    print(f"metrics written to {run / f'eval-{name}.json'}, samples to {run / f'samples-{name}.jsonl'}")
    return 0
