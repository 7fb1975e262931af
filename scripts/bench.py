"""Benchmark prefix methods: ms/step, tokens/s, peak memory and the paired ratios of docs/benchmarks.md.

python scripts/bench.py --json bench.json            # full run (MiniLM 32 x 64, wide tiny Llama)
python scripts/bench.py --quick                      # smoke test: two repetitions
python scripts/bench.py --smollm --json bench.json   # the decoder is SmolLM2-135M instead
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")

from moe_prefix.tools.benchmark import BenchConfig, format_markdown, format_report, run  # noqa: E402


def main(argv: list[str] | None = None) -> dict:
    defaults = BenchConfig()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", metavar="PATH", help="write every figure and ratio as JSON here")
    parser.add_argument("--markdown", metavar="PATH", help="write the tables as Markdown here")
    parser.add_argument("--quick", action="store_true", help="two repetitions: a smoke test, not a measurement")
    parser.add_argument("--smollm", action="store_true", help="decoder: smollm2-135m instead of the wide tiny Llama")
    parser.add_argument("--encoder", default=defaults.encoder, help="asset alias or local folder (default: minilm)")
    parser.add_argument("--decoder", default=defaults.decoder, help="wide-llama, tiny-llama, an alias or a folder")
    parser.add_argument("--reps", type=int, default=defaults.reps)
    parser.add_argument("--warmup", type=int, default=defaults.warmup)
    parser.add_argument("--no-memory", action="store_true", help="skip the profiled peak-memory call per arm")
    parser.add_argument("--threads", type=int, help="torch.set_num_threads (default: torch's choice)")
    parser.add_argument(
        "--clock",
        default=defaults.clock,
        choices=["wall", "cpu"],
        help="clock of the headline ratios (both are recorded); cpu: process CPU time, steadier on a shared machine",
    )
    parser.add_argument("--device", default=defaults.device)
    parser.add_argument("--dtype", default=defaults.dtype, choices=["float32", "bfloat16"])
    args = parser.parse_args(argv)
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    cfg = BenchConfig(
        encoder=args.encoder,
        decoder="smollm2-135m" if args.smollm else args.decoder,
        reps=args.reps,
        warmup=args.warmup,
        memory=not args.no_memory,
        device=args.device,
        dtype=args.dtype,
        clock=args.clock,
    )
    if args.quick:
        cfg = cfg.quick()
    log = lambda msg: print(msg, file=sys.stderr, flush=True)
    results = run(cfg, log=log)
    results["command"] = " ".join(["python", "scripts/bench.py", *(sys.argv[1:] if argv is None else argv)])
    print(format_report(results))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)
        log(f"wrote {args.json}")
    if args.markdown:
        with open(args.markdown, "w") as f:
            f.write(format_markdown(results) + "\n")
        log(f"wrote {args.markdown}")
    return results


if __name__ == "__main__":
    main()
