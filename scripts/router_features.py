"""Which router input lets k-means find the groups? python scripts/router_features.py --config FILE [key=value ...].

Prints, for the mean input embedding and the mean hidden state after each layer, the NMI between the data's
groups and the k-means clusters that `prefix.router_init=kmeans` would start from. The same as
`moe-prefix router-features` (moe_prefix/tools/cli.py), for a checkout without the installed command.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(
        ["router-features", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/router_features.py"
    )


if __name__ == "__main__":
    sys.exit(main())
