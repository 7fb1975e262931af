"""`python -m moe_prefix.tools COMMAND [options]`: the `moe-prefix` command without its launcher script.

The ablation runner starts its runs this way, so they use the interpreter and package it runs in.
"""

import sys

from .cli import main

if __name__ == "__main__":
    sys.exit(main())
