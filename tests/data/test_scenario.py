"""Scenarios: the documented domain sequences, requests that never touch held-out images, online
figures that count only answers served before an update landed, and update delay in rounds."""

from dataclasses import replace

import numpy as np
import pytest

from cdcca.akd.config import LabelPhase
from cdcca.akd.distill import AKDConfig
from cdcca.config import resolve
from cdcca.data.easyvqa import VQASet
from cdcca.data.scenario import Scenario, Slot, after_shift, recovery_curve, revisit_first_rounds, scenario_chunks
from cdcca.data.stream import Domain, heldout_questions, resolve_sequence, split_images
from cdcca.fleet.local import LocalFleet
from cdcca.fleet.traffic import SimulatedTraffic, serve_round
from cdcca.runtime import protocol
from cdcca.runtime.device import DeviceRuntime
from cdcca.uplink import UTSConfig

DEFAULT = ["pixelate:5", "gaussian_blur:5", "jpeg:5", "low_light:5"]


def walk(scenario: Scenario, stream: str = "default") -> list[str]:
    return [str(s.domain) for s in scenario.schedule(resolve_sequence(stream))]


def test_persistent_keeps_each_domain_four_rounds_of_80_by_default():
    sc = Scenario()
    assert (sc.per_domain, sc.size) == (4, 80)
    assert walk(sc) == [d for d in DEFAULT for _ in range(4)]
    assert [s.step for s in sc.schedule(resolve_sequence("default"))] == [0, 1, 2, 3] * 4
    assert 16 * 80 == 4 * 320            # the same 1,280 requests per device as the one-round stream


def test_recurring_brings_the_domains_back_visit_after_visit():
    slots = Scenario("recurring", visits=3).schedule(resolve_sequence("default"))
    assert [str(s.domain) for s in slots] == [d for _ in range(3) for d in DEFAULT for _ in range(2)]
    assert [s.visit for s in slots] == [v for v in range(3) for _ in range(8)]
    assert [s.step for s in slots] == [0, 1] * 12


def test_gradual_raises_one_corruptions_severity_from_1_to_5():
    assert walk(Scenario("gradual"), "gaussian_blur:5") == [f"gaussian_blur:{s}" for s in range(1, 6) for _ in range(2)]
    with pytest.raises(ValueError, match="severity"):
        walk(Scenario("gradual"), "clean")


def test_one_round_is_the_old_stream_and_overrides_apply():
    assert walk(Scenario("one-round")) == DEFAULT and Scenario("one-round").size == 320
    sc = Scenario("persistent", rounds_per_domain=2, round_size=10)
    assert walk(sc, "jpeg:5,low_light:5") == ["jpeg:5"] * 2 + ["low_light:5"] * 2 and sc.size == 10


@pytest.mark.parametrize("bad", [dict(name="forever"), dict(rounds_per_domain=0), dict(round_size=-1), dict(visits=0),
                                 dict(name="one-round", rounds_per_domain=3)])
def test_bad_scenarios_fail_with_the_setting_named(bad):
    with pytest.raises(ValueError, match=r"scenario|one-round"):
        Scenario(**bad)


def test_a_spec_written_before_scenarios_reads_as_persistent():
    sc = Scenario.from_spec({"stream": "default", "per_domain": 320, "rounds_per_domain": 4, "n_devices": 2})
    assert (sc.name, sc.per_domain, sc.size) == ("persistent", 4, 40)


def tiny_set(n_images=40, per_image=5) -> VQASet:
    ids = np.repeat(np.arange(n_images), per_image)
    return VQASet("t", np.zeros((n_images, 64, 64, 3), np.uint8), [f"q{i}" for i in range(len(ids))],
                  ["yes"] * len(ids), ids, ["yes", "no"])


def test_requests_stay_on_stream_images_and_do_not_repeat_within_a_domain():
    data = tiny_set()
    chunks = scenario_chunks(data, resolve_sequence("default"), Scenario("recurring", round_size=10), n_devices=2)
    stream_imgs, _ = split_images(len(data.images))
    assert all(len(c.question_ids) == 20 for c in chunks)
    used = {int(data.image_ids[q]) for c in chunks for q in c.question_ids}
    assert used <= set(stream_imgs) and not used & {int(data.image_ids[q]) for q in heldout_questions(data, 50)}
    pixelate = np.concatenate([c.question_ids for c in chunks if str(c.domain) == "pixelate:5"])
    assert len(set(pixelate.tolist())) == len(pixelate) == 80      # 100 stream questions: none repeats in 80
    again = scenario_chunks(data, resolve_sequence("default"), Scenario("recurring", round_size=10), n_devices=2)
    assert all(np.array_equal(a.question_ids, b.question_ids) for a, b in zip(chunks, again))


def test_jsonl_domains_take_part_in_a_scenario(tmp_path):
    from tests.data.test_jsonl_domains import write_domain

    a = write_domain(tmp_path / "a", "a")
    slots = Scenario("recurring").schedule(resolve_sequence(f"jpeg:5,{a}"))
    assert [str(s.domain) for s in slots] == ["jpeg:5", "jpeg:5", a, a] * 2
    spec = {"stream": f"jpeg:5,{a}", **Scenario("recurring", round_size=6).spec(), "index": 0, "n_devices": 1, "device_id": "d"}
    _, questions, gold, _, domain = SimulatedTraffic(spec).chunk(2)
    assert domain == a and len(questions) == 6 and all(g in ("red", "blue", "yes") for g in gold)


def test_recovery_curve_averages_each_round_of_a_domain_over_domains():
    rows = [{"domain": d, "step": s, "visit": v, "online_mc": 0.5 + 0.1 * s + 0.01 * v}
            for v in range(2) for d in ("a:5", "b:5") for s in range(3)] + [{"domain": "clean", "step": 0, "online_mc": 0.0}]
    assert recovery_curve(rows) == pytest.approx([0.505, 0.605, 0.705])
    assert revisit_first_rounds(rows) == pytest.approx(0.51)


FAST_AKD = AKDConfig(labels=LabelPhase(epochs=1, batch_size=4))


def served_versions(monkeypatch) -> list[int]:
    """The adapter version live each time a device answers a round's requests."""
    seen: list[int] = []
    original = DeviceRuntime.answer

    def answer(self, tokens, questions, sample_ids, batch_size=64):
        seen.append(self.store.version)
        return original(self, tokens, questions, sample_ids, batch_size)

    monkeypatch.setattr(DeviceRuntime, "answer", answer)
    return seen


@pytest.mark.parametrize("delay", [0, 1, 2])
def test_each_round_is_answered_with_the_adapters_live_then_and_delay_shifts_the_apply(tmp_path, monkeypatch, delay):
    seen = served_versions(monkeypatch)
    cfg = replace(resolve("tiny", sets=["stream.rounds_per_domain=2", f"stream.update_delay={delay}", "uts.budget=4"]),
                  akd=FAST_AKD)
    fleet = LocalFleet.setup(cfg, tmp_path)
    rows = [fleet.run_round(rnd)[0] for rnd in range(5)]
    fleet.close()
    # round k is served with every update sent in rounds ≤ k − 1 − delay, and none sent later
    assert seen == [max(0, k - delay) for k in range(5)]
    assert [r["version"] for r in rows] == [max(0, k + 1 - delay) for k in range(5)]
    assert [(r["step"], r["visit"]) for r in rows] == [(0, 0), (1, 0), (0, 0), (1, 0), (0, 0)]


def test_an_update_applied_after_round_k_changes_nothing_in_round_k(tmp_path, monkeypatch):
    """The online figure of a round is fixed when the round is served: applying its update afterwards
    (or not at all) leaves it as it was."""
    uts = UTSConfig(selection="budget", budget=4, token_scorer="energy")
    spec = {"stream": "default", **Scenario(rounds_per_domain=1).spec(), "index": 0, "n_devices": 1, "per_round": 8}
    from cdcca.runtime.cloud import CloudRuntime

    results = {}
    for apply in (True, False):
        dev = DeviceRuntime.create(tmp_path / f"dev-{apply}", "dev-0", tiny=True, uts=uts, stream=spec)
        cloud = CloudRuntime.open(tmp_path / f"cloud-{apply}", tiny=True, akd=FAST_AKD)
        served = serve_round(dev, 0)
        up = protocol.device_uplink(dev, 0, served=served)
        if apply:
            protocol.deliver(dev, cloud, 0, protocol.cloud_downlink(cloud, up), protocol.DelayedLink(0))
            assert dev.store.version == 1
        results[apply] = up.served["online_mc"]
        dev.close()
        cloud.close()
    assert results[True] == results[False]


def test_the_source_only_reference_answers_exactly_the_requests_the_device_served(tmp_path, monkeypatch):
    served: list[list[str]] = []
    original = DeviceRuntime.answer

    def answer(self, tokens, questions, sample_ids, batch_size=64):
        served.append(list(sample_ids))
        return original(self, tokens, questions, sample_ids, batch_size)

    monkeypatch.setattr(DeviceRuntime, "answer", answer)
    cfg = replace(resolve("tiny", sets=["fleet.devices=2", "stream.rounds_per_domain=2", "uts.budget=2"]), akd=FAST_AKD)
    fleet = LocalFleet.setup(cfg, tmp_path)
    fleet.run_round(0)
    fleet.run_round(1)
    first = fleet.devices[0]
    reference = [SimulatedTraffic(first.config["stream"]).chunk(r)[3] for r in range(2)]
    fleet.close()
    assert [served[0], served[2]] == reference            # device 0 served rounds 0 and 1 first in each round


def test_delayed_link_holds_packets_for_the_given_rounds():
    link = protocol.DelayedLink(2)
    link.send(0, [b"u0"])
    link.send(1, [b"u1"])
    assert link.arrived(0) == [] and link.arrived(1) == [] and link.in_transit
    assert link.arrived(2) == [b"u0"] and link.arrived(3) == [b"u1"] and not link.in_transit
    with pytest.raises(ValueError, match="≥ 0"):
        protocol.DelayedLink(-1)


def test_slots_name_domain_visit_and_step():
    assert Scenario("recurring", rounds_per_domain=1, visits=2).schedule([Domain("jpeg", 5)]) == \
        [Slot(Domain("jpeg", 5), 0, 0), Slot(Domain("jpeg", 5), 1, 0)]


def _visit_rows(start_round: int, adapted: list[list[bool]], never_updated: list[list[bool]], domain: str) -> list[dict]:
    return [{"round": start_round + i, "domain": domain, "step": i, "correct": a, "reference": b}
            for i, (a, b) in enumerate(zip(adapted, never_updated))]


def test_recovery_in_requests_counts_exactly_the_served_answers():
    """Two shifts of two rounds of 30 requests: the first 20 / 40 / 80 answers after each shift are counted in
    the order served, across the round boundary; half the gain is reached after a whole round, or at once."""
    half = [True] * 15 + [False] * 15                                   # 50 %
    most = [True] * 27 + [False] * 3                                    # 90 %
    rows = (_visit_rows(0, [half, most], [half, half], "pixelate:5")  # gains 0, +40: half reached in round 2
            + _visit_rows(2, [most, most], [half, half], "jpeg:5"))   # gains +40, +40: half reached at once
    out = after_shift(rows, reference="reference")
    assert out["first_20"] == pytest.approx((15 / 20 + 20 / 20) / 2)   # visit 1: 15 of its first 20 right
    assert out["first_40"] == pytest.approx((25 / 40 + 37 / 40) / 2)   # visit 1: 15 + the next round's first 10
    assert out["first_80"] == pytest.approx((42 / 60 + 54 / 60) / 2)   # only 60 served: all of them
    assert out["requests_to_half"] == pytest.approx((30 + 0) / 2)
    assert after_shift(rows, "reference") == {"first_20": 0.75, "first_40": 0.625, "first_80": 0.5}   # the twin
    no_gain = _visit_rows(0, [half, half], [half, half], "pixelate:5")
    assert after_shift(no_gain, reference="reference")["requests_to_half"] is None
    assert after_shift([{k: v for k, v in r.items() if k != "correct"} for r in rows]) is None


def test_the_embedded_fleet_records_every_served_answer_in_order(tmp_path):
    cfg = resolve("tiny", sets=["stream.rounds_per_domain=2"])
    fleet = LocalFleet.setup(cfg, tmp_path)
    rows = [fleet.run_round(rnd)[0] for rnd in range(2)]
    fleet.close()
    for row in rows:
        assert len(row["correct"]) > 0 and np.mean(row["correct"]) == pytest.approx(row["online_mc"])
    assert after_shift(rows)["first_20"] == pytest.approx(np.mean(rows[0]["correct"][:20]))
