"""Train one run: python scripts/fit.py --config configs/moe4.yaml [key=value ...] | --resume RUN_DIR."""

import argparse
import sys

from moe_prefix.tools.cli import fit_command, run_cli


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--config", help="YAML config (defaults apply to what it leaves out)")
    parser.add_argument("--resume", metavar="RUN_DIR", help="continue an interrupted run from its last checkpoint")
    parser.add_argument("overrides", nargs="*", help="config overrides such as prefix.top_k=2 trainer.max_steps=50")
    args = parser.parse_args(argv)
    return run_cli(fit_command, args.config, args.overrides, args.resume)


if __name__ == "__main__":
    sys.exit(main())
