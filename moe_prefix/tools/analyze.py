"""`moe-prefix analyze RUN_DIR`: read a finished run, probe its model, write RUN_DIR/analysis/report.md.

The reading is `moe_prefix.train` (run directory, rebuilt network), the statistics and figures are
`moe_prefix.analysis`; this module is where the two meet.
"""

from __future__ import annotations

from pathlib import Path

from moe_prefix.analysis import probes
from moe_prefix.analysis.report import write_report
from moe_prefix.train import run_dir as rd
from moe_prefix.train.datamodule import subsample
from moe_prefix.train.engine import load_run
from moe_prefix.train.generation import GenerationData
from moe_prefix.train.run_config import ConfigError

ANALYSIS_DIR = "analysis"  # inside the run directory


def validation_batches(data, max_examples: int | None = None, seed: int = 0):
    """Batches of a seeded random subset of the validation examples (in split order; None: all of them).

    Classification: ``data.val_set``. Generation: the reference pairs ``data.val_pairs`` (prompt + target,
    teacher-forced, the router reading the prompt), as the validation loss reads them.
    A random subset rather than the first examples: splits are often ordered by group, and the first N
    examples may all come from one domain.
    """
    items = data.val_pairs if isinstance(data, GenerationData) else data.val_set
    return data.eval_loader(subsample(items, max_examples, seed))


def prompt_batches(data, max_examples: int | None = None, seed: int = 0):
    """Generation runs: batches of a seeded random subset of the validation prompts (left-padded, with the source
    as group), what the router sees and the prefix is probed on at decoding time."""
    return data.generation_loader(subsample(data.val_prompts, max_examples, seed), data.val_examples)


def analyze_run(run_dir: str | Path, max_examples: int | None = 512, progress: bool = True) -> Path:
    """Write RUN_DIR/analysis/report.md and its PNG figures; returns the report's path.

    ``max_examples`` caps the validation examples run through the model for λ and the key distances
    (a seeded random subset; None: all); the routing statistics always use the whole routing.csv.
    """
    if max_examples is not None and max_examples < 1:
        raise ValueError(f"max_examples must be >= 1 or None, got {max_examples}")
    run_dir = Path(run_dir)
    cfg = rd.read_config(run_dir)
    table = rd.read_routing_table(run_dir)
    if len(table.ids) < 2:
        raise ConfigError(f"{run_dir} has {len(table.ids)} validation example(s): the statistics need at least 2")

    mixture, mass, distance, group_names = None, None, None, []
    if cfg.model.method == "prefix":
        cfg, built = load_run(run_dir, cfg)
        mixture, group_names = built.network.mixture, list(built.data.group_names)
        loader = validation_batches(built.data, max_examples)
        if cfg.prefix.prefix_mode != "decoupled":
            mass = probes.prefix_attention_mass(mixture, loader, progress=progress)
        distance = probes.key_distance(mixture, loader, progress=progress)

    return write_report(
        run_dir / ANALYSIS_DIR,
        run_dir.name,
        cfg,
        rd.read_metrics(run_dir),
        table,
        rd.read_training_log(run_dir),
        mixture=mixture,
        mass=mass,
        distance=distance,
        group_names=group_names,
    )
