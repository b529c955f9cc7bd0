"""vitkit against timm and Hugging Face, in one process, on the same weights: `vitkit bench`.

    .venv/bin/python bench/peers.py                         # Ti/16, S/16, B/16 at batch 1 and 32
    .venv/bin/python bench/peers.py --models S/16 --batch 32 --train
    .venv/bin/python bench/peers.py --no-infer --train Ti/7@28 S/16 --json train.json

Prints images/s, TFLOP/s and the fraction of this machine's fp32 and bf16 matmul peaks
(measured in the same run) for every implementation and precision, then vitkit's fastest
mode as a ratio to each peer's fastest (eager or compiled) and to its eager bf16 autocast.
"""

import argparse
import sys

from vitkit.cli.bench import add_bench_command

if __name__ == "__main__":
    parser = argparse.ArgumentParser(prog="bench/peers.py")
    add_bench_command(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(["bench", *sys.argv[1:]])
    sys.exit(args.func(args))
