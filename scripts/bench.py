"""Benchmark prefix methods: ms/step, tokens/s, peak memory and the paired ratios of docs/benchmarks.md.

python scripts/bench.py --json bench.json            # full run (MiniLM 32 x 64, wide tiny Llama)
python scripts/bench.py --quick                      # smoke test: two repetitions
python scripts/bench.py --smollm --json bench.json   # the decoder is SmolLM2-135M instead
python scripts/bench.py --preset gpu --json gpu.json # GPU scale: 1.1B Llama and MiniLM from configs, bf16 on CUDA

The same as `moe-prefix bench` (moe_prefix/tools/cli.py), for a checkout without the installed command.
HF_HUB_OFFLINE=1 unless set otherwise.
"""

import sys

from moe_prefix.tools.cli import main as cli_main


def main(argv=None) -> int:
    return cli_main(["bench", *(sys.argv[1:] if argv is None else argv)], prog="python scripts/bench.py")


if __name__ == "__main__":
    # Exit only on failure: tests run this file in-process (runpy), where SystemExit(0) would end them.
    if code := main():
        sys.exit(code)
