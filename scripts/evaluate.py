"""Evaluate a finished run: python scripts/evaluate.py RUN_DIR [--data FILE] [--no-prefix].

The same as `moe-prefix evaluate` (moe_prefix/tools/cli.py), for a checkout without the installed command.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["evaluate", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/evaluate.py")


if __name__ == "__main__":
    sys.exit(main())
