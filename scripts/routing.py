"""How each finished run of a sweep routed its validation inputs, one table.

  python scripts/routing.py docs/studies/gem4_smollm2 --arms moe4_recipe shared16_moe4x12

Per run of a routed arm: the mean weight of each input's first choice, how many experts are anyone's first
choice, dead experts, router entropy, NMI(top-1 expert, group), the expert each group mostly goes to, and the
sweep's main metric. The same as `moe-prefix routing` (moe_prefix/tools/cli.py), for a checkout without the
installed command.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["routing", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/routing.py")


if __name__ == "__main__":
    sys.exit(main())
