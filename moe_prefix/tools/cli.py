"""The `moe-prefix` command: fit, evaluate, analyze, router-features, ablate, compare, routing, gem4-verdict, bench,
prefetch.

`main` parses the arguments (`moe-prefix`, `python -m moe_prefix.tools` and the thin scripts/*.py all call it);
every command turns expected errors into one line and exit code 2, not a traceback. Imports that pull in
torch or transformers stay inside the command bodies.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

from moe_prefix.train.run_config import ConfigError, load_config

EXIT_USAGE = 2


def expected_errors() -> tuple[type[BaseException], ...]:
    """Errors caused by the user's input or by the run's surroundings (a full disk, a lost process): one line."""
    from moe_prefix.train.assets import AssetError
    from moe_prefix.train.checkpointing import CheckpointError
    from moe_prefix.train.engine import RunStoppedError
    from moe_prefix.train.module import NonFiniteLossError
    from moe_prefix.train.records import DataError

    errors = (ConfigError, DataError, AssetError, CheckpointError, NonFiniteLossError, RunStoppedError)
    return (*errors, FileNotFoundError)


def run_cli(command, *args) -> int:
    try:
        return command(*args) or 0
    except expected_errors() as err:
        print(f"error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


SHOWN_METRICS = ("val/loss", "val/f1", "val/bleu", "val/rougeL", "val/ser")


def _print_metrics(metrics: dict) -> None:
    """The metrics the commands print (all of them go to the run directory)."""
    for key, value in sorted(metrics.items()):
        if key.startswith("val/acc") or key in SHOWN_METRICS:
            print(f"{key}: {value:.4f}")


def fit_command(config: str | None, overrides: list[str], resume: str | None, init_from: str | None = None) -> int:
    from moe_prefix.train import run_dir as rd
    from moe_prefix.train.engine import fit

    if init_from:  # the same as the override model.init_from=RUN_DIR
        if resume:
            raise ConfigError("--init-from starts a new run from another run's weights; --resume continues a run")
        overrides = [*overrides, f"model.init_from={init_from}"]
    if resume:
        if config:
            raise ConfigError("use either --config or --resume RUN_DIR (the run directory holds its config)")
        if overrides:
            raise ConfigError("--resume continues a run as configured; overrides are not accepted")
        cfg = rd.read_config(resume)
        finished = rd.read_metrics(resume)
        if finished is not None:  # resumed as configured, a finished run has nothing left to train
            print(f"{resume} has already finished; nothing to resume. Its metrics:")
            _print_summary(finished, cfg, resume)
            return 0
    else:
        cfg = load_config(config, overrides)
    result = fit(cfg, resume=bool(resume))
    if result.metrics:  # empty on a non-zero DDP process: process 0 reports
        _print_summary(result.metrics, cfg, result.run_dir)
    return 0


TASK_METRICS = ("val/acc", "val/f1", "val/bleu", "val/rougeL", "val/ser", "val/loss")


def summary_block(m: dict, cfg, run_dir) -> str:
    """What a fit ends with: task metrics, routing health, size, time; the run directory last, as the
    last word of the last line (scripts and the tests read it there)."""
    lines = [f"-- {cfg.name} (seed {cfg.seed}) " + "-" * max(4, 60 - len(cfg.name))]
    for key in TASK_METRICS:
        if key in m:
            groups = sorted(k for k in m if k.startswith(f"{key}/"))  # per-group values, e.g. val/acc/tweets
            detail = ", ".join(f"{k.rsplit('/', 1)[1]} {m[k]:.4f}" for k in groups)
            lines.append(f"{key}: {m[key]:.4f}" + (f" ({detail})" if detail else ""))
    if "val/dead_experts" in m:  # a mixture: what a mixture user checks first
        lines.append(f"dead experts: {int(m['val/dead_experts'])} of {cfg.prefix.num_experts}")
    if "val/nmi" in m:  # rows had groups: does the top-1 expert follow them?
        # generation records carry their group themselves (gem4's source) with data.group_column null
        lines.append(f"routing NMI with {cfg.data.group_column or 'group'}: {m['val/nmi']:.4f}")
    lines.append(f"trainable parameters: {int(m['trainable_params']):,}")
    if "train_time_s" in m:
        steps = f" ({int(m['steps'])} steps)" if "steps" in m else ""
        lines.append(f"training time: {m['train_time_s']} s{steps}")
    lines.append(f"run directory: {run_dir}")
    return "\n".join(lines)


def _print_summary(m: dict, cfg, run_dir) -> None:
    print(summary_block(m, cfg, run_dir))


def evaluate_command(run_dir: str, data_file: str | None, no_prefix: bool = False) -> int:
    """Evaluate a saved run on its validation split, or on another file with the same columns.

    no_prefix (generation runs): score the bare backbone on the run's split and prompts instead.
    """
    from moe_prefix.train.engine import evaluate_run

    result = evaluate_run(run_dir, data_file, no_prefix)
    _print_metrics(result.metrics)
    print(f"metrics written to {result.path}")
    return 0


def analyze_command(run_dir: str, max_examples: int | None) -> int:
    from moe_prefix.tools.analyze import analyze_run

    print(f"report written to {analyze_run(run_dir, max_examples=max_examples)}")
    return 0


def router_features_command(config: str | None, overrides: list[str], seeds: int, transforms: list[str]) -> int:
    from moe_prefix.tools.router_features import group_separation, markdown_table

    cfg = load_config(config, overrides)
    print(markdown_table(group_separation(cfg, seeds=seeds, transforms=tuple(transforms)), cfg, seeds))
    return 0


def ablate_command(args: argparse.Namespace) -> int:
    from moe_prefix.tools.ablate import load_sweep, run_sweep, sweep_from_grid

    if args.sweep_file:
        sweep = load_sweep(args.sweep_file)
        if args.seeds:
            sweep.seeds = args.seeds
        sweep.overrides += args.set
    elif args.sweep:
        sweep = sweep_from_grid(args.base, args.sweep, args.seeds or [0, 1, 2], args.set)
    else:
        raise ConfigError("give a sweep file or --sweep key=v1,v2 (with --base CONFIG)")
    if args.publish:
        from moe_prefix.tools.ablate_publish import publish

        copied, summary = publish(sweep, args.out, args.publish)
        print(f"{copied} finished run(s) of {args.out} published to {args.publish}; summary written to {summary}")
        return 0
    summary = run_sweep(sweep, args.out, workers=args.workers)
    print(summary.read_text())
    print(f"summary written to {summary}")
    return 0


def compare_command(args: argparse.Namespace) -> int:
    from moe_prefix.tools.ablate_summary import compare_studies

    print(compare_studies(args.sweeps, metric=args.metric, scale=args.scale), end="")
    return 0


def routing_command(args: argparse.Namespace) -> int:
    from moe_prefix.tools.sweep_routing import routing_markdown, sweep_routing

    rows, groups = sweep_routing(args.sweep, arms=args.arms, metric=args.metric)
    print(routing_markdown(rows, groups), end="")
    return 0


def gem4_verdict_command(args: argparse.Namespace) -> int:
    from moe_prefix.tools.gem4_verdict import Study, verdict_markdown

    studies = [
        Study("SmolLM2-135M", args.smollm2, args.sweeps / "gem4_smollm2.yaml"),
        # its data's pinned release was withdrawn from the package index after seed 3 (docs/gem4.md)
        Study("Gemma 3 270M", args.gemma3, args.sweeps / "gem4_gemma3.yaml", stopped="stopped: data withdrawn"),
    ]
    print(verdict_markdown(studies), end="")
    return 0


def _offline_unless_asked() -> None:
    """HF_HUB_OFFLINE=1 unless the caller set it: the benchmark times local models, never a hub request."""
    if "HF_HUB_OFFLINE" in os.environ:
        return
    os.environ["HF_HUB_OFFLINE"] = "1"
    from huggingface_hub import constants

    # huggingface_hub reads the variable once, at import: whatever imported it before this ran missed it.
    constants.HF_HUB_OFFLINE = True


def bench_command(args: argparse.Namespace) -> int:
    _offline_unless_asked()
    if args.overrides and not args.gem4:
        raise ConfigError(f"config overrides ({' '.join(args.overrides)}) apply with --gem4 CONFIG only")
    if args.gem4 and args.markdown:
        raise ConfigError("--markdown writes the prefix-method tables; with --gem4 use --json")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    results, report = _bench_generation(args, log) if args.gem4 else _bench_prefix_methods(args, log)
    results["command"] = args.command_line
    print(report)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {args.json}")
    if args.markdown:
        from moe_prefix.tools.benchmark import format_markdown

        with open(args.markdown, "w") as f:
            f.write(format_markdown(results) + "\n")
        log(f"wrote {args.markdown}")
    return 0


def _bench_prefix_methods(args: argparse.Namespace, log) -> tuple[dict, str]:
    from moe_prefix.tools.bench_presets import PRESET_SETTINGS, run_preset
    from moe_prefix.tools.benchmark import BenchConfig, format_report, run

    given = {
        "encoder": args.encoder,
        "decoder": "smollm2-135m" if args.smollm else args.decoder,
        "reps": args.reps,
        "warmup": args.warmup,
        "device": args.device,
        "dtype": args.dtype,
        "clock": args.clock,
    }
    settings = {**PRESET_SETTINGS.get(args.preset, {}), **{k: v for k, v in given.items() if v is not None}}
    cfg = BenchConfig(**settings, memory=not args.no_memory)
    if args.quick:
        cfg = cfg.quick()
    results = run_preset(args.preset, cfg, log=log) if args.preset else run(cfg, log=log)
    return results, format_report(results)


def _bench_generation(args: argparse.Namespace, log) -> tuple[dict, str]:
    """bench --gem4 CONFIG: the parts of a generation run, each two ways (moe_prefix/tools/bench_generation.py)."""
    from moe_prefix.tools.bench_generation import format_gem4, run_gem4

    sizes = {"reps": 1, "val_reps": 1, "steps": 1, "val_inputs": 4} if args.quick else {}
    if args.reps:
        sizes["reps"] = args.reps
    results = run_gem4(args.gem4, args.overrides, log=log, **sizes)
    return results, format_gem4(results)


def prefetch_command(aliases: list[str]) -> int:
    from moe_prefix.train import assets

    print(f"cache: {assets.cache_dir()}")
    # one alias at a time, so that a release the index no longer serves does not stop the others
    wanted = aliases or assets.prefetch_aliases()
    unavailable = []
    for alias in wanted:
        try:
            located = assets.prefetch_all([alias])
        except assets.AssetUnavailable as err:
            print(f"{alias}: not fetched: {err}", file=sys.stderr)
            unavailable.append(alias)
            continue
        for name, path in located.items():
            print(f"{name}: {path}")
    if unavailable:
        raise assets.AssetError(
            f"{len(unavailable)} of {len(wanted)} assets not fetched ({', '.join(unavailable)}): the package index "
            "no longer serves their pinned release (each one's line above says which); the rest are in the cache"
        )
    return 0


# -- argument parsing ------------------------------------------------------------------------------

PROG = "moe-prefix"


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _asset_alias(text: str) -> str:
    from moe_prefix.train import assets

    known = [*assets.MODEL_ALIASES, *assets.DATA_ALIASES]
    if text not in known:
        raise argparse.ArgumentTypeError(f"unknown alias {text!r}; choose from {', '.join(known)}")
    return text


def _fit_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config (defaults apply to what it leaves out)")
    p.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    p.add_argument("--init-from", metavar="RUN_DIR", help="start from a finished run's weights (model.init_from)")
    p.add_argument("overrides", nargs="*", help="config overrides such as prefix.top_k=2 trainer.max_steps=50")
    p.set_defaults(run=lambda a: run_cli(fit_command, a.config, a.overrides, a.resume, a.init_from))


def _evaluate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `fit`")
    p.add_argument("--data", help="a file, folder or hf: id with the run's columns (default: its validation split)")
    p.add_argument(
        "--no-prefix",
        action="store_true",
        help="generation runs: score the bare backbone on the run's split and prompts (the zero-shot reference)",
    )
    p.set_defaults(run=lambda a: run_cli(evaluate_command, a.run_dir, a.data, a.no_prefix))


def _analyze_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("run_dir", help="a run directory written by `fit`")
    p.add_argument(
        "--max-examples",
        type=_count,
        default=512,
        help="validation examples run through the model for λ and key distances (default 512; 0: all)",
    )
    p.set_defaults(run=lambda a: run_cli(analyze_command, a.run_dir, a.max_examples or None))


def _router_features_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="YAML config of a prefix run whose data has groups (data.group_column)")
    p.add_argument("--seeds", type=int, default=3, help="k-means seeds per router input (default 3)")
    p.add_argument(
        "--transforms",
        type=lambda text: text.split(","),
        default=["layernorm"],
        help="feature normalisations to compare, comma-separated: layernorm (the router's, default), spherical, whiten",
    )
    p.add_argument("overrides", nargs="*", help="config overrides such as data.source=multisource4_shared")
    p.set_defaults(run=lambda a: run_cli(router_features_command, a.config, a.overrides, a.seeds, a.transforms))


def _ablate_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep_file", nargs="?", help="YAML sweep such as configs/ablations/headline.yaml")
    p.add_argument("--base", help="base config for --sweep (relative to the current directory)")
    p.add_argument("--sweep", nargs="*", default=[], metavar="KEY=V1,V2", help="grid of values to sweep")
    p.add_argument("--seeds", nargs="*", type=int, help="seeds (default: the file's, else 0 1 2)")
    p.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    p.add_argument("--workers", type=int, default=1, help="runs side by side (each in its own process)")
    p.add_argument("--out", required=True, help="sweep folder: one run directory per arm and seed")
    p.add_argument(
        "--publish",
        metavar="DEST",
        help="run nothing: copy the finished runs' configs, metrics and per-example tables (no weights or "
        "checkpoints) to DEST and summarise them there, a folder to commit",
    )
    p.set_defaults(run=lambda a: run_cli(ablate_command, a))


def _compare_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweeps", nargs="+", metavar="SWEEP_DIR", help="summarised sweep folders (summary.csv, runs.csv)")
    p.add_argument("--metric", help="a metric of the summaries (default: each sweep's main metric)")
    p.add_argument("--scale", type=float, default=100.0, help="multiply means and differences (default 100: points)")
    p.set_defaults(run=lambda a: run_cli(compare_command, a))


def _routing_parser(p: argparse.ArgumentParser) -> None:
    p.add_argument("sweep", metavar="SWEEP_DIR", help="a sweep folder (ARM/seedN run directories with routing.csv)")
    p.add_argument("--arms", nargs="+", metavar="ARM", help="only these arms (default: every arm with routing)")
    p.add_argument("--metric", help="a metric of the runs' metrics.json (default: the sweep's main metric)")
    p.set_defaults(run=lambda a: run_cli(routing_command, a))


def _gem4_verdict_parser(p: argparse.ArgumentParser) -> None:
    studies = Path("docs/studies")
    p.add_argument(
        "--smollm2", type=Path, default=studies / "gem4_smollm2", help="published SmolLM2 sweep (%(default)s)"
    )
    p.add_argument("--gemma3", type=Path, default=studies / "gem4_gemma3", help="published Gemma 3 sweep (%(default)s)")
    p.add_argument(
        "--sweeps",
        type=Path,
        default=Path("configs/ablations"),
        help="folder of gem4_smollm2.yaml and gem4_gemma3.yaml: the planned seeds (%(default)s)",
    )
    p.set_defaults(run=lambda a: run_cli(gem4_verdict_command, a))


def _bench_parser(p: argparse.ArgumentParser) -> None:
    # Defaults of None fall back to BenchConfig's, which bench_command imports (torch) only when it runs.
    p.add_argument("--json", metavar="PATH", help="write every figure and ratio as JSON here")
    p.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown here")
    p.add_argument("--quick", action="store_true", help="two repetitions: a smoke test, not a measurement")
    p.add_argument(
        "--preset",
        choices=["gpu", "seq2seq"],
        help="gpu: a 1.1B Llama and MiniLM from configs, bf16 on CUDA (floor, PEFT, moe1, moe4, both attention paths); "
        "seq2seq: BART-base from its config beside PEFT (PEFT's site and all three sites)",
    )
    p.add_argument("--smollm", action="store_true", help="decoder: smollm2-135m instead of the wide tiny Llama")
    p.add_argument(
        "--gem4",
        metavar="CONFIG",
        help="instead: a generation config's training step (logits everywhere vs at scored positions) and "
        "validation (split order vs longest first), e.g. configs/gem4_gemma3.yaml; --reps, --quick, --json apply",
    )
    p.add_argument("overrides", nargs="*", help="with --gem4: config overrides, key=value")
    p.add_argument("--encoder", help="asset alias or local folder (default: minilm)")
    p.add_argument("--decoder", help="wide-llama (default), tiny-llama, an alias or a folder")
    p.add_argument("--reps", type=int, help="timed repetitions per arm (default 7)")
    p.add_argument("--warmup", type=int, help="untimed repetitions first (default 1)")
    p.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory call per arm")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    p.add_argument(
        "--clock",
        choices=["wall", "cpu"],
        help="clock of the headline ratios (default wall; both are recorded); cpu: process CPU time, steadier "
        "on a shared machine",
    )
    p.add_argument("--device", help="default cpu")
    p.add_argument("--dtype", choices=["float32", "bfloat16"], help="default float32")
    p.set_defaults(run=lambda a: run_cli(bench_command, a))


def _prefetch_parser(p: argparse.ArgumentParser) -> None:
    from moe_prefix.train import assets  # the standard library only

    p.add_argument(
        "aliases",
        nargs="*",
        type=_asset_alias,
        metavar="ALIAS",
        help=f"assets to fetch (default: all of {', '.join([*assets.MODEL_ALIASES, *assets.DATA_ALIASES])})",
    )
    p.set_defaults(run=lambda a: run_cli(prefetch_command, a.aliases))


COMMANDS = {
    "fit": (_fit_parser, "train one run: --config FILE [key=value ...] | --resume RUN_DIR"),
    "evaluate": (_evaluate_parser, "score a finished run on its validation split or on another file"),
    "analyze": (_analyze_parser, "write RUN_DIR/analysis/report.md with its figures"),
    "router-features": (
        _router_features_parser,
        "before training: which router input (embeddings, hidden after layer l) lets k-means find the groups",
    ),
    "ablate": (_ablate_parser, "run an ablation sweep (arms x seeds) and summarise it; restarts where it stopped"),
    "compare": (_compare_parser, "one table of the tested arms of several summarised sweeps, Δ with its interval"),
    "routing": (
        _routing_parser,
        "per run of a sweep: first-choice weight, experts in use, dead experts, NMI with the group, metric",
    ),
    "gem4-verdict": (
        _gem4_verdict_parser,
        "issue 25's goal clause by clause from the gem4 sweeps' published summaries (docs/gem4.md)",
    ),
    "bench": (_bench_parser, "benchmark prefix methods: ms/step, tokens/s, peak memory (docs/benchmarks.md)"),
    "prefetch": (_prefetch_parser, "fetch the pinned offline assets into the cache (then copy it elsewhere)"),
}


def build_parser(prog: str | None = None) -> argparse.ArgumentParser:
    """prog, when given, names every command's program (scripts/X.py give theirs); else `moe-prefix X`."""
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (add_arguments, summary) in COMMANDS.items():
        p = commands.add_parser(name, prog=prog or f"{PROG} {name}", help=summary, description=summary)
        add_arguments(p)
    return parser


def one_line_warning(message, category, filename, lineno, line=None) -> str:
    """A warning as one line, without the source line Python prints under it; ours (their messages say
    what happened and what to do) without a location either."""
    if f"{os.sep}moe_prefix{os.sep}" in filename:
        return f"warning: {message}\n"
    return f"{filename}:{lineno}: {category.__name__}: {message}\n"


def main(argv: list[str] | None = None, prog: str | None = None) -> int:
    """`moe-prefix COMMAND [options]`; returns the exit code."""
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # What bench records to reproduce its figures: the command as typed, after the subcommand name.
    args.command_line = " ".join([prog or f"{PROG} {args.command}", *argv[argv.index(args.command) + 1 :]])
    shown, warnings.formatwarning = warnings.formatwarning, one_line_warning
    try:
        return args.run(args)
    finally:  # main() may run inside another program (tests, notebooks): leave its format as it was
        warnings.formatwarning = shown
