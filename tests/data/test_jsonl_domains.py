"""Your own JSONL files as domains of the continual stream: parsing, the merged data, each file's own
request / held-out halves, the candidate union, the tokens — and the whole demo on two files."""

import json

import numpy as np
import pytest
from PIL import Image

from cdcca.data.scenario import Scenario, scenario_chunks
from cdcca.data.stream import (
    Domain,
    domain_split,
    heldout_questions,
    resolve_sequence,
    stream_data,
)
from cdcca.data.task import Task
from cdcca.trained_pair import PairError, run_stream


def write_domain(folder, name, n_images=12, answers=("red", "blue", "yes")):
    """A user's JSONL domain built from easy-VQA test images (answers of the shipped pair's set by default)."""
    from cdcca.data.easyvqa import load_split

    test = load_split("test")
    folder.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n_images):
        Image.fromarray(test.images[500 + i]).save(folder / f"{name}{i}.png")
        for q in range(2):
            rows.append({"image": f"{name}{i}.png", "question": f"question {q} about picture {i}?",
                         "answer": answers[(i + q) % len(answers)]})
    path = folder / f"{name}.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return str(path)


def test_a_path_ending_in_jsonl_is_a_file_domain():
    d = Domain.parse("data/night.jsonl")
    assert d.path == "data/night.jsonl" and str(d) == "data/night.jsonl"
    assert resolve_sequence("pixelate:5,data/night.jsonl")[1] == d
    with pytest.raises(ValueError, match=r"\.jsonl"):
        Domain.parse("night.csv")


def test_builtin_streams_are_unchanged_by_the_merge():
    from cdcca.data.easyvqa import load_split

    domains = resolve_sequence("default")
    assert stream_data(domains, Task()) is load_split("test") and run_stream("default") is load_split("test")


def test_file_domains_get_their_own_halves_and_the_candidate_union(tmp_path):
    a = write_domain(tmp_path / "a", "a")
    b = write_domain(tmp_path / "b", "b", answers=("green", "perhaps"))
    domains = resolve_sequence(f"pixelate:5,{a},{b}")
    data = stream_data(domains, Task())
    base = stream_data(resolve_sequence("default"), Task())
    assert len(data.images) == len(base.images) + 24 and data.sources[a] == (1000, 1012)
    assert data.candidates[:13] == base.candidates and data.candidates[13:] == ["perhaps"]
    assert run_stream(f"{a},{b}", tiny=True).candidates == data.candidates      # tiny models take the union
    stream_imgs, held = domain_split(data, domains[1])
    assert set(stream_imgs) | set(held) == set(range(1000, 1012)) and not set(stream_imgs) & set(held)
    chunks = scenario_chunks(data, domains, Scenario("one-round", round_size=20))
    assert len(chunks[0].question_ids) == 20 and len(chunks[1].question_ids) == 12   # a small file gives what it has
    assert set(data.image_ids[chunks[1].question_ids]) <= set(stream_imgs)
    held_q = heldout_questions(data, 100, domain=domains[1])
    assert set(data.image_ids[held_q]) <= set(held) and len(held_q) == 12
    assert np.array_equal(heldout_questions(data, 50), heldout_questions(base, 50))      # built-ins as before


def test_file_domain_tokens_and_requests(tmp_path):
    from cdcca.fleet.traffic import SimulatedTraffic
    from cdcca.runtime.evaluate import domain_tokens

    a = write_domain(tmp_path / "a", "a")
    data = stream_data(resolve_sequence(f"jpeg:5,{a}"), Task())
    tokens = domain_tokens(Domain.parse(a), data)
    assert tokens.shape == (1012, 49, 1280) and tokens[1000:].abs().sum() > 0 and tokens[:1000].abs().sum() == 0
    spec = {"stream": f"jpeg:5,{a}", "per_domain": 8, "index": 0, "n_devices": 1, "device_id": "d"}
    toks, questions, gold, _, domain = SimulatedTraffic(spec).chunk(1)
    assert domain == a and toks.shape[0] == len(questions) == 8 and all(g in ("red", "blue", "yes") for g in gold)


def test_the_demo_runs_on_two_jsonl_domains(tmp_path):
    """`cdcca demo --preset quick --stream A.jsonl,B.jsonl` with real models, on a small slice."""
    from cdcca.bench.demo import run_demo

    a = write_domain(tmp_path / "a", "a")
    b = write_domain(tmp_path / "b", "b", answers=("green", "no"))
    from cdcca.config import resolve

    cfg = resolve("quick", sets=[f'data.domains="{a},{b}"', "stream.rounds_per_domain=1", "stream.round_size=8",
                                 "eval.heldout_n=8", "eval.curve_n=8", "uts.budget=4"])
    metrics = run_demo(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "metrics.json").is_file() and (tmp_path / "run" / "report.html").is_file()
    assert metrics["summary"]["domains"] == [a, b]
    assert len(metrics["rounds"]) == 2 and all(r["uploads"] > 0 for r in metrics["rounds"])
    assert [r["source_only_online_mc"] is not None for r in metrics["rounds"]] == [True, True]


def test_a_file_with_answers_the_pair_never_learnt_is_refused_in_one_line(tmp_path):
    """The shipped pair knows easy-VQA's 13 answers; a file answering 'perhaps' would silently score 0."""
    b = write_domain(tmp_path / "b", "b", answers=("green", "perhaps"))
    with pytest.raises(PairError, match=r"\['perhaps'\] are not in the pair's answer set \(easy-vqa, 13 answers") as err:
        run_stream(f"pixelate:5,{b}")
    assert "\n" not in str(err.value) and "--weights" in str(err.value)


def test_a_stream_whose_answers_share_first_tokens_runs_end_to_end(tmp_path):
    """'dark blue' / 'dark green' and '2' / '20' cannot be told apart by their first token: multiple choice
    scores whole answers, and the tiny loop serves, uploads, distils and applies as usual."""
    from cdcca.bench.demo import run_demo
    from cdcca.config import resolve

    a = write_domain(tmp_path / "a", "a", answers=("dark blue", "dark green", "2", "20"))
    metrics = run_demo(resolve("tiny", sets=[f'data.domains="{a}"', "stream.rounds_per_domain=2"]), tmp_path / "run", "tiny")
    rounds = metrics["rounds"]
    assert len(rounds) == 2 and all(r["uploads"] > 0 for r in rounds) and rounds[-1]["bytes_down"] > 0
