"""Run an ablation sweep (arms x seeds) and summarise it.

  python scripts/ablate.py configs/ablations/headline.yaml --out runs/headline
  python scripts/ablate.py --base configs/moe4.yaml --sweep prefix.top_k=1,2 --seeds 0 1 2 --out runs/topk

A killed sweep restarts where it stopped: finished runs are skipped, interrupted ones resumed.
"""

import argparse
import sys

from moe_prefix.tools.ablate import load_sweep, run_sweep, sweep_from_grid
from moe_prefix.tools.cli import run_cli
from moe_prefix.train.run_config import ConfigError


def command(args) -> int:
    if args.sweep_file:
        sweep = load_sweep(args.sweep_file)
        if args.seeds:
            sweep.seeds = args.seeds
        sweep.overrides += args.set
    elif args.sweep:
        sweep = sweep_from_grid(args.base, args.sweep, args.seeds or [0, 1, 2], args.set)
    else:
        raise ConfigError("give a sweep file or --sweep key=v1,v2 (with --base CONFIG)")
    summary = run_sweep(sweep, args.out, workers=args.workers)
    print(summary.read_text())
    print(f"summary written to {summary}")
    return 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("sweep_file", nargs="?", help="YAML sweep under configs/ablations/")
    parser.add_argument("--base", help="base config for --sweep")
    parser.add_argument("--sweep", nargs="*", default=[], metavar="KEY=V1,V2", help="grid of values to sweep")
    parser.add_argument("--seeds", nargs="*", type=int, help="seeds (default: the file's, else 0 1 2)")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every arm")
    parser.add_argument("--workers", type=int, default=1, help="runs side by side (each in its own process)")
    parser.add_argument("--out", required=True, help="sweep folder: one run directory per arm and seed")
    return run_cli(command, parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
