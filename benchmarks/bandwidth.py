"""Measured memory read bandwidth, and the decode roofline it sets for a model file.

    python benchmarks/bandwidth.py                      # 1, 2, ... threads
    python benchmarks/bandwidth.py -t 2 --model /work/bench-models/0.8b-Q4_K_M.gguf

Decoding one token reads (about) every weight of the model once, so a machine that
reads B bytes/s cannot decode faster than B / (bytes per token) tokens/s. The probe
sums a buffer far larger than any cache with torch (reads only, the way a decode step
streams weights); `qwen35 bench` runs the same probe and reports tg as a fraction of it.
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from qwen35.bench import BANDWIDTH_BUFFER_BYTES, decode_bytes_per_token, measure_read_bandwidth


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.strip().splitlines()[0])
    parser.add_argument("-t", "--threads", type=int, action="append",
                        help="thread count to probe (repeatable; default 1 up to the usable CPUs)")
    parser.add_argument("--mib", type=int, default=BANDWIDTH_BUFFER_BYTES // 2**20, help="buffer size in MiB")
    parser.add_argument("--model", type=Path, help="a GGUF: also print its bytes per decoded token and roofline")
    args = parser.parse_args(argv)
    threads = args.threads or list(range(1, len(os.sched_getaffinity(0)) + 1))
    per_token = decode_bytes_per_token(args.model) if args.model else None
    if per_token:
        print(f"{args.model.name}: {per_token / 2**20:,.1f} MiB of weights read per decoded token")
    for count in threads:
        bandwidth = measure_read_bandwidth(count, nbytes=args.mib * 2**20)
        line = f"{count} thread{'s' if count > 1 else ''}: {bandwidth / 1e9:6.1f} GB/s read"
        if per_token:
            line += f"  -> decode roofline {bandwidth / per_token:8.1f} tok/s"
        print(line)
    return 0


if __name__ == "__main__":
    sys.exit(main())
