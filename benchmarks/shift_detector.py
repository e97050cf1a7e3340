"""How soon the device's shift detector fires after a shift, and how often it fires without one (JSON, then a
table), on the served pair's cached test tokens (no model pass: the token signal needs none).

    .venv/bin/python benchmarks/shift_detector.py [--weights DIR] [--z 3 5 8] [--requests 4000]

Delay: the default persistent stream's requests in order, the detector seeded with the pair's clean source
images (as a device starts); for each shift (the first one is away from clean) the requests served in the new
domain before it fired. False alarms: a stream without a shift, one domain (clean or shifted) for
``--requests`` random questions, counted per 1,000 requests; the seeded detector's one firing at the start of a
shifted stream is the shift away from clean, not a false alarm, and is left out.
"""

from __future__ import annotations

import argparse
import json
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

STEADY = [("clean", 0), ("jpeg", 5), ("pixelate", 5), ("low_light", 5)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--weights", default=None, help="a pair directory (default: the shipped pair)")
    parser.add_argument("--z", type=float, nargs="+", default=[3.0, 5.0, 8.0])
    parser.add_argument("--requests", type=int, default=4000)
    args = parser.parse_args()
    if args.weights:
        os.environ["CDCCA_WEIGHTS"] = args.weights

    import numpy as np

    from cdcca.config import resolve
    from cdcca.data.scenario import stream_spec
    from cdcca.data.stream import Domain
    from cdcca.fleet.traffic import SimulatedTraffic
    from cdcca.runtime.evaluate import test_tokens
    from cdcca.runtime.shift import ShiftDetector
    from cdcca.trained_pair import active
    from cdcca.uplink.tokens import default_token_stats

    source = default_token_stats().pooled
    if source is None:
        raise SystemExit("error: this pair's token statistics keep no clean images; re-run its pretraining's last step")
    source = source.numpy()
    cfg = resolve()
    traffic = SimulatedTraffic(dict(stream_spec(cfg.data.domains, cfg.scenario, cfg.seed), device_id="d0"))
    pooled, starts, domain = [], [], None
    for rnd in range(traffic.rounds()):
        tokens, _, _, _, name = traffic.chunk(rnd)
        if name != domain:
            starts.append(sum(len(p) for p in pooled))
            domain = name
        pooled.append(tokens.mean(1).numpy())
    stream = np.concatenate(pooled)
    data = active().task.split("test")
    picks = np.random.default_rng(0).choice(len(data.questions), args.requests)
    steady = {f"{n}:{s}": test_tokens(Domain(n, s)).float().mean(1).numpy()[data.image_ids[picks]] for n, s in STEADY}

    def firings(seq: np.ndarray, z: float) -> list[int]:
        detector, fired = ShiftDetector.seeded(source, z=z), []
        for s in range(0, len(seq), 20):                       # served 20 at a time, as the embedded fleet does
            if (report := detector.observe(seq[s:s + 20])) is not None:
                fired.append(report.at)
        return fired

    rows = []
    for z in args.z:
        fired = firings(stream, z)
        delays = [next((f - start for f in fired if start <= f < end), None)
                  for start, end in zip(starts, starts[1:] + [len(stream)])]
        false = {name: [f for f in firings(seq, z) if not (name != "clean:0" and f <= 40)] for name, seq in steady.items()}
        rows.append({"z": z, "delays": delays, "missed": sum(d is None for d in delays),
                     "false_alarms_per_1000": round(1000 * sum(map(len, false.values())) / (len(steady) * args.requests), 3),
                     "false_alarms": false})
    print(json.dumps({"requests_per_steady_stream": args.requests, "shifts": len(starts), "rows": rows}, indent=1))
    print(f"\n{'z':>4}  {'requests to detect each shift':<32}  missed  false alarms / 1,000 requests")
    for r in rows:
        print(f"{r['z']:>4g}  {r['delays']!s:<32}  {r['missed']:>6}  {r['false_alarms_per_1000']}")


if __name__ == "__main__":
    main()
