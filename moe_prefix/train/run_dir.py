"""The run directory: the one place that names its files, writes them and reads them back.

A fit writes (all at the top of the folder unless said otherwise):

- `config.yaml`: the resolved run config;
- `metrics.json`: final validation metrics and run statistics (strict JSON: a value that is not a finite
  number is left out);
- `adapter.safetensors`: the trainable tensors only, with the backbone and config as metadata;
- `routing.csv`: one row per validation example (the task's columns, then prefix length and routing);
- `labels.json` (classification): the class names in class-index order, as the data names them;
- `samples.jsonl` (generation): generations next to their references;
- `rollouts.jsonl` (generation with optim.objective rft or prefix_rft): the last training steps' sampled texts
  with their demonstration length, reward, SER and advantage;
- `logs/metrics.csv` (and, as trainer.loggers asks, `tensorboard/`, `wandb/`, `trackers.json`), `checkpoints/`.

Every file written here goes through `checkpointing.write_atomically`: a full disk leaves no half file under
a final name. metrics.json, which marks a run finished, is written after the others.

`evaluate` adds `eval-<name>.json` (and `samples-<name>.jsonl` for generation). Evaluation, analysis
and the ablation runner read runs through `read_config`, `read_metrics`, `load_weights`,
`read_routing_table` and `read_training_log`.
"""

from __future__ import annotations

import csv
import itertools
import json
import math
from collections.abc import Callable
from pathlib import Path

import numpy as np
from omegaconf import OmegaConf
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from moe_prefix.analysis.routing_stats import RoutingTable
from moe_prefix.bank import PrefixBank

from .checkpointing import check_compatible, write_atomically
from .networks import trainable_state_dict
from .run_config import ConfigError, RunConfig, config_from_dict, save_config, to_dict

CONFIG_FILE = "config.yaml"
METRICS_FILE = "metrics.json"
WEIGHTS_FILE = "adapter.safetensors"
ROUTING_FILE = "routing.csv"
LABELS_FILE = "labels.json"
SAMPLES_FILE = "samples.jsonl"
ROLLOUTS_FILE = "rollouts.jsonl"
CHECKPOINT_DIR = "checkpoints"
LOG_DIR = "logs"


def eval_file(name: str) -> str:
    """Metrics of `evaluate` on a named split or file."""
    return f"eval-{name}.json"


def samples_file(name: str | None = None) -> str:
    """Generations of the fit (name None) or of an `evaluate` on a named split."""
    return SAMPLES_FILE if name is None else f"samples-{name}.jsonl"


# -- writing ----------------------------------------------------------------------------------------


def has_checkpoints(run_dir: Path) -> bool:
    return any((run_dir / CHECKPOINT_DIR).glob("*.ckpt"))


def create(cfg: RunConfig, run_dir: Path) -> None:
    """Make the folder and save the resolved config (after every check has passed)."""
    run_dir.mkdir(parents=True, exist_ok=True)
    write_atomically(run_dir / CONFIG_FILE, lambda tmp: save_config(cfg, tmp))


def write_json(path: Path, values: dict) -> None:
    """Strict JSON (what `jq` and other strict parsers accept): non-finite numbers are left out."""
    finite = {k: v for k, v in values.items() if not (isinstance(v, float) and not math.isfinite(v))}
    text = json.dumps(finite, indent=2, sort_keys=True, allow_nan=False) + "\n"
    write_atomically(path, lambda tmp: tmp.write_text(text))


def write_weights(run_dir: Path, network, cfg: RunConfig) -> None:
    """adapter.safetensors: the trainable tensors, with the backbone, method and config as metadata."""
    weights = {k: v.contiguous() for k, v in trainable_state_dict(network).items()}
    meta = {"backbone": cfg.model.backbone, "method": cfg.model.method, "config": json.dumps(to_dict(cfg))}
    write_atomically(run_dir / WEIGHTS_FILE, lambda tmp: save_file(weights, str(tmp), metadata=meta))


def write_per_example_table(
    path: Path, rows: list[dict], num_experts: int, columns: list[str], cells: Callable[[dict], list]
) -> None:
    """A CSV of validation rows (sorted by index): the task's own columns, then the routing, if any."""
    routed = bool(rows) and "weights" in rows[0]
    header = columns + (["prefix_len", "experts"] + [f"w{i}" for i in range(num_experts)] if routed else [])

    def write(tmp: Path) -> None:
        with open(tmp, "w", newline="") as f:
            writer = csv.writer(f)
            writer.writerow(header)
            for row in sorted(rows, key=lambda r: r["index"]):
                line = cells(row)
                if routed:
                    line += [f"{row['prefix_len']:.3f}", " ".join(map(str, row["experts"]))]
                    line += [f"{w:.6f}" for w in row["weights"]]
                writer.writerow(line)

    write_atomically(path, write)


def write_jsonl(path: Path, records) -> None:
    """One JSON object per line, in the order given (rollouts.jsonl: the training rollouts as sampled)."""

    def write(tmp: Path) -> None:
        with open(tmp, "w") as f:
            for record in records:
                f.write(json.dumps(record, ensure_ascii=False) + "\n")

    write_atomically(path, write)


def write_samples(path: Path, rows: list[dict], n: int) -> None:
    """n validation inputs in split order: id, (source,) prediction, references; one JSON per line. Where rows
    carry a source (gem4, mixes), the n are shared out evenly over the sources, so that a mix sorted by source
    does not show its first source only."""
    ordered = sorted(rows, key=lambda r: r["index"])
    by_source: dict[str, list[dict]] = {}
    for row in ordered:
        by_source.setdefault(row.get("source") or "", []).append(row)
    # round-robin over the sources: each source's first input, then each one's second, ...
    rounds = itertools.zip_longest(*by_source.values())
    chosen = [row for round_ in rounds for row in round_ if row is not None][:n]
    keys = ("id", "source", "prediction", "references") if len(by_source) > 1 else ("id", "prediction", "references")
    write_jsonl(path, ({k: row[k] for k in keys} for row in sorted(chosen, key=lambda r: r["index"])))


# -- reading ----------------------------------------------------------------------------------------


def read_config(run_dir: str | Path) -> RunConfig:
    path = Path(run_dir) / CONFIG_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} is not a run directory (no {CONFIG_FILE})")
    return config_from_dict(OmegaConf.to_container(OmegaConf.load(path)))


def read_metrics(run_dir: str | Path) -> dict | None:
    """The final metrics of a finished run; None while the run has not finished."""
    path = Path(run_dir) / METRICS_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def _weights_path(run_dir: str | Path) -> Path:
    """RUN_DIR/adapter.safetensors, or the error that the run did not finish."""
    path = Path(run_dir) / WEIGHTS_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {WEIGHTS_FILE}: the run did not finish")
    return path


def load_weights(run_dir: str | Path, network, cfg: RunConfig) -> None:
    """Load a finished run's trained tensors into a network built from its config (checked to fit)."""
    path = _weights_path(run_dir)
    with safe_open(str(path), framework="pt") as f:
        saved_backbone = (f.metadata() or {}).get("backbone", "unknown")
    weights = load_file(str(path))
    check_compatible(weights, trainable_state_dict(network), saved_backbone, cfg.model.backbone)
    network.load_state_dict(weights, strict=False)


def upcycle_weights(run_dir: str | Path, network, cfg: RunConfig) -> None:
    """prefix.expert_init=upcycle: start every expert of `network` from the one-expert prefix of a finished run.

    The experts get that prefix plus seeded noise (`PrefixBank.upcycle`), its shared part and everything else that
    trained (a task head, train_modules) are copied as they are; the router and length head stay as built, so they
    start as the run's recipe says (k-means, when router_init asks for it, runs after this).
    """
    source_cfg = read_config(run_dir)
    if source_cfg.model.method != "prefix" or source_cfg.prefix.num_experts != 1:
        raise ConfigError(
            f"prefix.expert_init=upcycle needs model.init_from to be a one-expert prefix run; {run_dir} has "
            f"method={source_cfg.model.method}, num_experts={source_cfg.prefix.num_experts}"
        )
    for key in ("prefix_len", "shared_len"):
        if getattr(source_cfg.prefix, key) != getattr(cfg.prefix, key):
            raise ConfigError(
                f"prefix.{key}={getattr(cfg.prefix, key)} but the upcycled run {run_dir} has "
                f"{getattr(source_cfg.prefix, key)}: each expert copies its prefix, so they must match"
            )
    path = _weights_path(run_dir)
    weights = load_file(str(path))
    mixture = network.mixture
    name = next(n for n, m in network.named_modules() if m is mixture)
    source = PrefixBank(source_cfg.prefix, mixture.dims)  # reparameterised or not, as the source trained
    source.load_state_dict(_under(weights, f"{name}.bank"))
    mixture.bank.upcycle(source.tensor()[0].detach(), cfg.prefix.upcycle_noise, seed=cfg.seed)
    if mixture.shared is not None:
        shared = PrefixBank(source_cfg.prefix, mixture.dims, shared=True)
        shared.load_state_dict(_under(weights, f"{name}.shared"))
        mixture.shared.set_from_activations(shared.tensor().detach())
    # Everything else that trained (head, train_modules): not the source's prefix, router or length head.
    rest = {k: v for k, v in weights.items() if not k.startswith(f"{name}.") or k.startswith(f"{name}.backbone.")}
    expected = {k: v for k, v in trainable_state_dict(network).items() if k in rest or not k.startswith(f"{name}.")}
    check_compatible(rest, expected, source_cfg.model.backbone, cfg.model.backbone)
    network.load_state_dict(rest, strict=False)


def _under(weights: dict, name: str) -> dict:
    """The entries of `weights` below module `name`, with that prefix removed."""
    return {k[len(name) + 1 :]: v for k, v in weights.items() if k.startswith(f"{name}.")}


def read_routing_table(run_dir: str | Path) -> RoutingTable:
    """Read RUN_DIR/routing.csv (classification or generation runs; the latter have no group or label)."""
    path = Path(run_dir) / ROUTING_FILE
    if not path.is_file():
        raise ConfigError(f"{run_dir} has no {ROUTING_FILE}: the run did not finish")
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    if not rows:
        raise ConfigError(f"{path} has no rows")
    col = {key: [r[key] for r in rows] for key in rows[0]}
    table = RoutingTable(
        ids=np.array(col["id"]),
        groups=np.array(col.get("group", [""] * len(rows))),
        loss=np.array(col["loss"], dtype=float),
        input_len=np.array(col["input_len"], dtype=int),
    )
    if "label" in col:
        table.labels = np.array(col["label"], dtype=int)
        table.predictions = np.array(col["prediction"], dtype=int)
    weight_keys = sorted((k for k in col if k[:1] == "w" and k[1:].isdigit()), key=lambda k: int(k[1:]))
    if weight_keys:
        table.prefix_len = np.array(col["prefix_len"], dtype=float)
        table.experts = np.array([[int(i) for i in s.split()] for s in col["experts"]], dtype=int)
        table.weights = np.array([col[k] for k in weight_keys], dtype=float).T
    return table


def read_training_log(run_dir: str | Path) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """RUN_DIR/logs/metrics.csv as {key: (steps, values)}, keeping only the rows where the key was logged."""
    path = Path(run_dir) / LOG_DIR / "metrics.csv"
    if not path.is_file():
        return {}
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    log = {}
    for key in rows[0] if rows else []:
        if key in ("step", "epoch"):
            continue
        pairs = [(int(r["step"]), float(r[key])) for r in rows if r.get(key) not in (None, "")]
        if pairs:
            steps, values = map(np.array, zip(*pairs, strict=True))
            log[key] = (steps, values)
    return log
