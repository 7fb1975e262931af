"""Analyse a finished run: python scripts/analyze.py RUN_DIR [--max-examples N].

Writes RUN_DIR/analysis/report.md with its figures and prints the report's path last.
"""

import argparse
import sys

from moe_prefix.tools.cli import run_cli


def analyze(run_dir: str, max_examples: int | None) -> int:
    from moe_prefix.analysis.report import analyze_run

    print(f"report written to {analyze_run(run_dir, max_examples=max_examples)}")
    return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run_dir", help="a run directory written by scripts/fit.py")
    parser.add_argument(
        "--max-examples",
        type=_count,
        default=512,
        help="validation examples run through the model for λ and key distances (default 512; 0: all)",
    )
    args = parser.parse_args(argv)
    return run_cli(analyze, args.run_dir, args.max_examples or None)


if __name__ == "__main__":
    sys.exit(main())
