"""UTS uplink benchmark: scorer AUROC, uplink bytes and ratios, scoring overhead on the default shift stream.

Thin script over :func:`cdcca.bench.uts.run_bench` (the same logic as ``cdcca bench uts``)::

    PYTHONPATH=src python benchmarks/bench_uts.py --n 400 [--repeats 5] [--threads 1] [--codes full-int8,pca64-int8]
"""

from __future__ import annotations

import argparse
import json
import os
import sys

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=400, help="stream requests over the default shift sequence")
    ap.add_argument("--repeats", type=int, default=5, help="timing repeats (medians are reported)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--codes", default=None, help="comma-separated token codes to compare (default: all variants)")
    args = ap.parse_args(argv)

    import torch

    from cdcca.bench.uts import run_bench

    torch.set_num_threads(args.threads)
    codes = {} if args.codes is None else {"codes": [c.strip() for c in args.codes.split(",") if c.strip()]}
    res = run_bench(args.n, repeats=args.repeats, log=lambda m: print(m, file=sys.stderr), **codes)
    print(json.dumps(res, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
