"""The tested arms of several summarised sweeps in one table.

  python scripts/compare.py docs/studies/shared_structure_multisource_shared docs/studies/shared_structure_vader

Per sweep and arm: Δ against the sweep's reference with its 95 % interval, Holm p at the seed and the example
level, the most dead experts any seed ended with. The same as `moe-prefix compare` (moe_prefix/tools/cli.py),
for a checkout without the installed command.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["compare", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/compare.py")


if __name__ == "__main__":
    sys.exit(main())
