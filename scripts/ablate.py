"""Run an ablation sweep (arms x seeds) and summarise it.

  python scripts/ablate.py configs/ablations/headline.yaml --out runs/headline
  python scripts/ablate.py --base configs/moe4.yaml --sweep prefix.top_k=1,2 --seeds 0 1 2 --out runs/topk
  python scripts/ablate.py configs/ablations/headline.yaml --out runs/headline --publish docs/studies/headline

A killed sweep restarts where it stopped: finished runs are skipped, interrupted ones resumed. --publish runs
nothing: it copies the finished runs' small files (no weights) to a folder to commit and summarises them there.
The same as `moe-prefix ablate` (moe_prefix/tools/cli.py), for a checkout without the installed command.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["ablate", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/ablate.py")


if __name__ == "__main__":
    sys.exit(main())
