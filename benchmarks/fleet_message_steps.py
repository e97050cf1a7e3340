"""What the SuperNode's message handling costs each step of a round: its wait after an empty pull, and
starting each ClientApp cold (a fresh process) or warm (forked from a parent that imported everything).

Brings up a real 2-device fleet on tiny models (SuperLink, SuperNodes, TLS, node authentication) once per
variant, runs the same rounds on it, and reads each step's seconds from the round log. The fleets take turns
(A, B, C, A, B, C, …) so that a machine that slows down during the run slows all of them. A variant is
IDLE_S:cold|warm; the first is the baseline.

    python benchmarks/fleet_message_steps.py --variants 3.0:cold,0.5:cold,0.5:warm --repeats 2 --rounds 4

Prints JSON (every round's step seconds per variant, and medians) and a table on stderr.
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
from cdcca.fleet.supernode import IDLE_ENV, WARM_ENV

STEPS = ("uplink", "cloud", "apply")


def rounds_of(variant: str, rounds: int, root: Path) -> list[dict]:
    """Round log rows of ``rounds`` tiny rounds on a fresh fleet whose SuperNodes run ``variant``."""
    wait, start = variant.split(":")
    if start not in ("cold", "warm"):
        raise SystemExit(f"a variant is IDLE_S:cold or IDLE_S:warm, got {variant!r}")
    os.environ[IDLE_ENV], os.environ[WARM_ENV] = repr(float(wait)), "1" if start == "warm" else "0"
    state = Path(tempfile.mkdtemp(prefix=f"{wait}-{start}-", dir=root))
    deploy.up(state, 2, port=deploy.free_port(), tiny=True, apis=False, log=lambda _: None)
    try:
        cfg = resolve("tiny", sets=[f"fleet.rounds={rounds}", 'fleet.traffic="stream"', "akd.prefix.epochs=1"])
        result = deploy.run(state, cfg, timeout=900, echo=None)
        if not result.ok:
            raise SystemExit(f"the fleet run {variant} failed: {result.status}; log {result.log_path}")
        return [{"variant": variant, "round": r["round"], "wall_s": r.get("wall_s"), **r.get("step_s", {})}
                for r in result.rounds]
    finally:
        deploy.down(state)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--variants", default="3.0:cold,0.5:cold,0.5:warm",
                    help="IDLE_S:cold|warm, comma-separated; the first is the baseline")
    ap.add_argument("--repeats", type=int, default=2, help="fleets per variant, taking turns")
    ap.add_argument("--rounds", type=int, default=4, help="rounds per fleet")
    args = ap.parse_args()
    variants = args.variants.split(",")
    rows: list[dict] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cdcca-idle-") as root:
        for _ in range(args.repeats):
            for variant in variants:
                rows += rounds_of(variant, args.rounds, Path(root))
    medians = {}
    for variant in variants:
        mine = [r for r in rows if r["variant"] == variant]
        medians[variant] = {k: round(statistics.median(r[k] for r in mine if k in r), 2)
                            for k in ("wall_s", *STEPS) if any(k in r for r in mine)}
    base = medians[variants[0]]
    out = {"variants": variants, "repeats": args.repeats, "rounds": args.rounds, "medians": medians,
           "ratio_to_baseline": {w: {k: round(v / base[k], 3) for k, v in m.items() if base.get(k)}
                                 for w, m in medians.items()},
           "rows": rows, "seconds": round(time.perf_counter() - t0, 1)}
    print(json.dumps(out, indent=2))
    steps = [k for k in ("wall_s", *STEPS) if k in base]
    print("idle s:start | " + " | ".join(f"{k} median s" for k in steps), file=sys.stderr)
    for v, m in medians.items():
        print(f"{v} | " + " | ".join(str(m.get(k)) for k in steps), file=sys.stderr)


if __name__ == "__main__":
    main()
