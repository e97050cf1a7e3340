"""What whole-answer multiple choice costs per request against the one-pass first-token scorer, on the real
device model, in one process (JSON, then a table; medians over repeats).

    .venv/bin/python benchmarks/mc_scoring_cost.py [--weights DIR] [--requests 32] [--repeats 5] [--threads 2]

Both scorers run on the same requests of the pair's test set (clean tokens): ``one-pass`` is the scorer every
answer set with distinct first tokens uses; ``whole answers`` is the one a set with shared first tokens uses
(:func:`cdcca.model.answer.candidate_probs`), run here on the same candidates so the ratio is the price alone.
The agreement row says how often the two pick the same candidate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

os.environ.setdefault("HF_HUB_OFFLINE", "1")


def main() -> None:
    import torch

    from cdcca.assets import load_tokenizer
    from cdcca.data.features import cached_features
    from cdcca.model.answer import candidate_probs, mc_predict
    from cdcca.model.pair import load_pretrained
    from cdcca.model.prompt import Prompter
    from cdcca.trained_pair import use

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--weights", default=None, help="a trained pair's directory (default: the shipped pair)")
    ap.add_argument("--requests", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    pair = use(args.weights)
    data = pair.task.split("test")
    model, prompter = load_pretrained("device"), Prompter(load_tokenizer(), pair.answers)
    ids = list(range(args.requests))
    tokens = cached_features(data)[data.image_ids[ids]].float()
    questions = [data.questions[i] for i in ids]

    def timed(fn) -> tuple[float, torch.Tensor]:
        out, runs = None, []
        for _ in range(args.repeats):
            t = time.perf_counter()
            out = fn()
            runs.append(time.perf_counter() - t)
        return statistics.median(runs), out

    one_s, one = timed(lambda: mc_predict(model, prompter, tokens, questions))
    whole_s, whole = timed(lambda: candidate_probs(model, prompter, tokens, questions))
    gold = torch.tensor([prompter.candidates.index(data.answers[i]) for i in ids])
    result = {"pair": str(pair.root), "candidates": len(prompter.candidates), "requests": args.requests,
              "threads": args.threads, "repeats": args.repeats,
              "one_pass_ms_per_request": round(1000 * one_s / args.requests, 2),
              "whole_answers_ms_per_request": round(1000 * whole_s / args.requests, 2),
              "ratio": round(whole_s / one_s, 2),
              "agreement": float((one.argmax(-1) == whole.argmax(-1)).float().mean()),
              "one_pass_mc": float((one.argmax(-1) == gold).float().mean()),
              "whole_answers_mc": float((whole.argmax(-1) == gold).float().mean())}
    print(json.dumps(result))
    print(f"{'scorer':<16}{'ms / request':>14}{'MC':>8}")
    print(f"{'one-pass':<16}{result['one_pass_ms_per_request']:>14}{result['one_pass_mc']:>8.3f}")
    print(f"{'whole answers':<16}{result['whole_answers_ms_per_request']:>14}{result['whole_answers_mc']:>8.3f}"
          f"   ×{result['ratio']} the one-pass time; same pick on {result['agreement']:.0%} of requests")


if __name__ == "__main__":
    main()
