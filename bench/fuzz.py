"""Nightly-style fuzzing: compile N random architectures (tests/fuzz_arch.py) and count outcomes.

Usage: python bench/fuzz.py [--n 1000] [--start 0] [--out bench/results/fuzz.jsonl]
Each case i uses random.Random(i), so any case replays alone (``--start i --n 1``). Outcomes:
verified (exact part within tolerance, the returned model runs at batch b+1), verified-pinned
(the ProgramModule's static trace only runs at batch b), a clean PrunecError, or a crash (any
other exception, a bug). One JSON line per case; the summary goes to stdout."""
from __future__ import annotations

import argparse
import collections
import json
import os
import random
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import torch  # noqa: E402

from tests.fuzz_arch import random_spec, run_case  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--n", type=int, default=1000)
    p.add_argument("--start", type=int, default=0)
    p.add_argument("--out", default="bench/results/fuzz.jsonl")
    args = p.parse_args()
    torch.set_num_threads(1)
    counts: collections.Counter[str] = collections.Counter()
    start = time.perf_counter()
    with open(args.out, "a") as f:
        for i in range(args.start, args.start + args.n):
            spec = random_spec(random.Random(i))
            t0 = time.perf_counter()
            try:
                outcome = run_case(spec)
                row = {"case": i, "outcome": outcome.split(":")[0], "detail": outcome}
            except Exception as err:  # a crash: record it and go on
                row = {"case": i, "outcome": "crash", "detail": f"{type(err).__name__}: {str(err)[:400]}",
                       "where": traceback.format_exc().splitlines()[-3:]}
            row.update(seconds=round(time.perf_counter() - t0, 2), spec=spec)
            counts[row["outcome"]] += 1
            f.write(json.dumps(row) + "\n")
            f.flush()
    total = time.perf_counter() - start
    print(json.dumps({"cases": args.n, "counts": counts, "seconds": round(total, 1),
                      "load": os.getloadavg()}))


if __name__ == "__main__":
    main()
