"""What the SuperNode's wait after an empty pull costs each message step of a round.

Brings up a real 2-device fleet on tiny models (SuperLink, SuperNodes, TLS, node authentication) once per idle
wait, runs the same rounds on it, and reads each step's seconds from the round log. The fleets take turns
(A, B, A, B, …) so that a machine that slows down during the run slows both.

    python benchmarks/supernode_idle_wait.py --waits 3.0,0.5 --repeats 2 --rounds 4 > idle_wait.json

Prints JSON (every round's step seconds per wait, and medians) and a table on stderr.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

from cdcca.config import resolve
from cdcca.fleet import deploy
from cdcca.fleet.supernode import IDLE_ENV

STEPS = ("uplink", "cloud", "apply")


def rounds_with_wait(wait: float, rounds: int, root: Path) -> list[dict]:
    """Round log rows of ``rounds`` tiny rounds on a fresh fleet whose SuperNodes wait ``wait`` s when idle."""
    os.environ[IDLE_ENV] = repr(wait)
    state = Path(tempfile.mkdtemp(prefix=f"idle{wait}-", dir=root))
    deploy.up(state, 2, port=deploy.free_port(), tiny=True, apis=False, log=lambda _: None)
    try:
        cfg = resolve("tiny", sets=[f"fleet.rounds={rounds}", 'fleet.traffic="stream"', "akd.prefix.epochs=1"])
        result = deploy.run(state, cfg, timeout=900, echo=None)
        if not result.ok:
            raise SystemExit(f"the fleet run with idle wait {wait} s failed: {result.status}; log {result.log_path}")
        return [{"wait_s": wait, "round": r["round"], "wall_s": r.get("wall_s"), **r.get("step_s", {})}
                for r in result.rounds]
    finally:
        deploy.down(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--waits", default="3.0,0.5", help="idle waits to compare, seconds (the first is the baseline)")
    ap.add_argument("--repeats", type=int, default=2, help="fleets per wait, taking turns")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per fleet")
    args = ap.parse_args()
    waits = [float(w) for w in args.waits.split(",")]
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdcca-idle-") as root:
        for _ in range(args.repeats):
            for wait in waits:
                rows += rounds_with_wait(wait, args.rounds, Path(root))
    medians = {}
    for wait in waits:
        mine = [r for r in rows if r["wait_s"] == wait]
        medians[repr(wait)] = {k: round(statistics.median(r[k] for r in mine if k in r), 2)
                               for k in ("wall_s", *STEPS) if any(k in r for r in mine)}
    base = medians[repr(waits[0])]
    out = {"waits": waits, "repeats": args.repeats, "rounds": args.rounds, "medians": medians,
           "ratio_to_baseline": {w: {k: round(v / base[k], 3) for k, v in m.items() if base.get(k)}
                                 for w, m in medians.items()},
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=2))
    steps = [k for k in ("wall_s", *STEPS) if k in base]
    print("idle wait | " + " | ".join(f"{k} median s" for k in steps), file=sys.stderr)
    for w, m in medians.items():
        print(f"{w} s | " + " | ".join(str(m.get(k)) for k in steps), file=sys.stderr)


if __name__ == "__main__":
    main()
