"""Evaluate a finished run: python scripts/evaluate.py RUN_DIR [--data FILE] [--no-prefix]."""

import argparse
import sys

from moe_prefix.tools.cli import evaluate_command, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("run_dir", help="a run directory written by scripts/fit.py")
    parser.add_argument("--data", help="a .csv/.tsv/.jsonl file with the run's columns (default: its validation split)")
    parser.add_argument(
        "--no-prefix",
        action="store_true",
        help="generation runs: score the bare backbone on the run's split and prompts (the zero-shot reference)",
    )
    args = parser.parse_args(argv)
    return run_cli(evaluate_command, args.run_dir, args.data, args.no_prefix)


if __name__ == "__main__":
    sys.exit(main())
