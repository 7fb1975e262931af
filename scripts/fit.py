"""Train one run: python scripts/fit.py --config configs/moe4.yaml [key=value ...] | --resume RUN_DIR.

The same as `moe-prefix fit` (moe_prefix/tools/cli.py), for a checkout without the installed command.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["fit", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/fit.py")


if __name__ == "__main__":
    sys.exit(main())
