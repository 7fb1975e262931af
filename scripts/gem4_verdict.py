"""Issue 25's goal against the gem4 sweeps' published summaries, one table (docs/gem4.md's verdict).

  python scripts/gem4_verdict.py                 # the committed studies, docs/studies/gem4_*
  python scripts/gem4_verdict.py --smollm2 runs/gem4_smollm2 --gemma3 runs/gem4_gemma3

Each clause of the goal with the figure it rests on, read from the runner's summary.csv; a backbone with
fewer seeds than its sweep file plans is marked interim. The same as `moe-prefix gem4-verdict`
(moe_prefix/tools/cli.py), for a checkout without the installed command; run it from the checkout's root.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["gem4-verdict", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/gem4_verdict.py")


if __name__ == "__main__":
    sys.exit(main())
