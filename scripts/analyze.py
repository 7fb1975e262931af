"""Analyse a finished run: python scripts/analyze.py RUN_DIR [--max-examples N].

Writes RUN_DIR/analysis/report.md with its figures and prints the report's path last. The same as
`moe-prefix analyze` (moe_prefix/tools/cli.py), for a checkout without the installed command.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["analyze", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/analyze.py")


if __name__ == "__main__":
    sys.exit(main())
