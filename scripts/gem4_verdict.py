"""Issue 25's goal against the gem4 sweeps' published summaries, one table (docs/gem4.md's verdict).

  python scripts/gem4_verdict.py                 # the committed studies, docs/studies/gem4_*
  python scripts/gem4_verdict.py --smollm2 runs/gem4_smollm2 --gemma3 runs/gem4_gemma3

Each clause of the goal with the figure it rests on, read from the runner's summary.csv; a backbone with
fewer seeds than its sweep file plans is marked interim (moe_prefix/tools/gem4_verdict.py).
"""

import argparse
import sys
from pathlib import Path

from moe_prefix.tools.gem4_verdict import Study, verdict_markdown
from moe_prefix.train.run_config import ConfigError

ROOT = Path(__file__).resolve().parent.parent


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python scripts/gem4_verdict.py", description=__doc__.splitlines()[0])
    p.add_argument("--smollm2", type=Path, default=ROOT / "docs/studies/gem4_smollm2", help="published SmolLM2 sweep")
    p.add_argument("--gemma3", type=Path, default=ROOT / "docs/studies/gem4_gemma3", help="published Gemma 3 sweep")
    args = p.parse_args(argv)
    studies = [
        Study("SmolLM2-135M", args.smollm2, ROOT / "configs/ablations/gem4_smollm2.yaml"),
        Study("Gemma 3 270M", args.gemma3, ROOT / "configs/ablations/gem4_gemma3.yaml"),
    ]
    try:
        print(verdict_markdown(studies), end="")
    except ConfigError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
