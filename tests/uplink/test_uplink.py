"""UTS uplink: scorers, selection, the uplink packet round-trip and its validation, fill modes, AUROC."""

from __future__ import annotations

import json
import math
import struct

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cdcca import wire
from cdcca.model.answer import Answer
from cdcca.uplink import (
    SAMPLE_SCORERS,
    TOKEN_SCORERS,
    TOKEN_STATS_PATH,
    TokenStats,
    UplinkSample,
    UTSConfig,
    auroc,
    build_uplink,
    collect_token_stats,
    decode_uplink,
    plan_uplink,
    png_bytes,
    quantize_int8,
    sample_cost,
    score_energy,
    score_mc_dropout,
    score_ood,
    select_samples,
    select_tokens,
    view_uncertainty,
)
from cdcca.wire import PacketError

torch.set_num_threads(1)
FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
TEXT = st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=24)


def _answer(p_top: float, n: int = 13, text: str = "red") -> Answer:
    rest = (1 - p_top) / (n - 1)
    return Answer(text=text, mc=text, confidence=p_top, entropies=[1 - p_top], margin=p_top - rest,
                  mc_probs=[p_top] + [rest] * (n - 1))


def _samples(n: int = 3, P: int = 49, C: int = 16, seed: int = 0, keep_ratio: float = 0.5) -> list[UplinkSample]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, P, C, generator=g)
    keep = select_tokens(torch.rand(n, P, generator=g), keep_ratio)
    return [UplinkSample(f"s{i}", x[i], f"what is {i}?", "red", 0.25 + 0.1 * i, 0.6, keep[i], mc="red")
            for i in range(n)]


def _stats(P: int, C: int, seed: int = 1) -> TokenStats:
    return collect_token_stats(torch.randn(64, P, C, generator=torch.Generator().manual_seed(seed)))


# -- configuration -------------------------------------------------------------------------------
@pytest.mark.parametrize("field, value", [("sample_scorer", "vibes"), ("selection", "all"), ("token_scorer", "x"),
                                          ("keep_ratio", 0.0), ("keep_ratio", 1.5), ("direction", "up"),
                                          ("fill", "noise"), ("token_dtype", "int4"), ("budget", -1),
                                          ("mc_dropout_passes", 1), ("mc_dropout_p", 1.0), ("temperature", 0),
                                          ("threshold", float("nan")), ("allow_image", "yes")])
def test_config_rejects_bad_values_naming_the_field(field, value):
    with pytest.raises(ValueError, match=f"UTSConfig.{field}"):
        UTSConfig(**{field: value})


def test_default_config_is_the_papers_keep_ratio_masked_int8_and_never_the_image():
    cfg = UTSConfig()
    assert (cfg.keep_ratio, cfg.fill, cfg.token_dtype, cfg.allow_image) == (0.5, "mask", "int8", False)


# -- sample scorers and selection -------------------------------------------------------------------
def test_every_sample_scorer_ranks_a_doubtful_answer_above_a_sure_one():
    sure, doubtful = _answer(0.95), _answer(0.3)
    for name, fn in SAMPLE_SCORERS.items():
        assert fn(doubtful) > fn(sure), name


def test_confidence_scorer_is_one_minus_the_product_of_step_max_probs():
    a = Answer(text="red", mc="red", confidence=0.9 * 0.5, entropies=[0.1, 0.2], margin=0.3)
    assert SAMPLE_SCORERS["confidence"](a) == pytest.approx(1 - 0.45)
    assert SAMPLE_SCORERS["entropy"](a) == pytest.approx(0.15)
    assert SAMPLE_SCORERS["margin"](a) == pytest.approx(0.7)


def test_confident_sample_stays_on_the_device():
    tokens = torch.randn(2, 49, 8)
    answers = [_answer(0.98), _answer(0.2)]
    out = plan_uplink(tokens, ["q0", "q1"], answers, ["sure", "unsure"], UTSConfig(selection="threshold", threshold=0.5),
                      stats=_stats(49, 8))
    assert [s.sample_id for s in out] == ["unsure"]
    assert out[0].keep.sum() == round(0.5 * 49) and out[0].uncertainty == pytest.approx(0.8)


def test_budget_selection_picks_the_k_most_uncertain():
    u = [0.1, 0.9, 0.5, 0.95, 0.2, 0.7]
    assert select_samples(u, UTSConfig(selection="budget", budget=3)) == [1, 3, 5]
    assert select_samples(u, UTSConfig(selection="budget", budget=0)) == []
    assert select_samples([0.1, float("nan")], UTSConfig(selection="budget", budget=1)) == [1]


def test_band_policy_leaves_the_most_uncertain_share_on_the_device():
    u = [0.1, 0.9, 0.5, 0.95, 0.2, 0.7]              # most uncertain first: 3, 1, 5, 2, 4, 0
    band = UTSConfig(selection="budget", budget=3, skip_top=1 / 3)
    assert select_samples(u, band) == [2, 4, 5]      # the two most uncertain (3 and 1) are skipped
    with pytest.raises(ValueError, match="skip_top"):
        UTSConfig(skip_top=1.0)


def test_threshold_selection_uploads_only_samples_above_the_threshold():
    assert select_samples([0.1, 0.5, 0.51, 0.9], UTSConfig(selection="threshold", threshold=0.5)) == [2, 3]


def test_byte_selection_fills_the_budget_most_uncertain_first_and_the_packet_fits():
    n, C = 6, 64
    answers = [_answer(p) for p in (0.3, 0.1, 0.9, 0.2, 0.5, 0.4)]
    cfg = UTSConfig(selection="bytes", byte_budget=3 * sample_cost(25, C) + 2048, token_scorer="energy")
    out = plan_uplink(torch.randn(n, 49, C), [f"q{i}" for i in range(n)], answers, [f"s{i}" for i in range(n)], cfg)
    assert [s.sample_id for s in out] == ["s0", "s1", "s3"]       # the three least confident
    assert len(build_uplink(out, cfg, device_id="d", adapter_version="v")) <= cfg.byte_budget


def test_view_consistency_scorer_needs_the_device_and_combines_both_views(tiny_device, prompter):
    from cdcca.model.answer import answer_batch

    tokens, qs = torch.rand(3, 49, 32), ["what color is the shape?", "is there a circle?", "what shape is it?"]
    answers = answer_batch(tiny_device, prompter, tokens, qs)
    u = view_uncertainty(tiny_device, prompter, tokens, qs, answers, stats=_stats(49, 32))
    assert len(u) == 3 and all(0 <= x <= math.sqrt(SAMPLE_SCORERS["mc_disagreement"](a)) + 1e-9 for x, a in zip(u, answers))
    cfg = UTSConfig(sample_scorer="view_consistency", selection="threshold", threshold=-1.0)
    with pytest.raises(ValueError, match="needs"):
        plan_uplink(tokens, qs, answers, ["a", "b", "c"], cfg, stats=_stats(49, 32))
    out = plan_uplink(tokens, qs, answers, ["a", "b", "c"], cfg, stats=_stats(49, 32), model=tiny_device, prompter=prompter)
    assert [s.uncertainty for s in out] == pytest.approx(u)


# -- token scorers ----------------------------------------------------------------------------------
def test_token_scorers_return_one_score_per_token():
    x = torch.randn(2, 49, 8)
    for name, fn in TOKEN_SCORERS.items():
        assert fn(x, stats=_stats(49, 8)).shape == (2, 49), name


def test_ood_scorer_ranks_a_shifted_token_above_in_distribution_ones():
    g = torch.Generator().manual_seed(0)
    source = torch.randn(500, 49, 32, generator=g) * 0.5 + 2.0
    stats = collect_token_stats(source)
    x = torch.randn(1, 49, 32, generator=g) * 0.5 + 2.0          # in distribution
    x[0, 17] += 3.0                                              # one shifted token (6 σ)
    scores = score_ood(x, stats=stats)
    assert scores[0].argmax() == 17
    assert scores[0, 17] > 5 * scores[0].median()


def test_shipped_token_stats_are_per_position_source_statistics():
    if not TOKEN_STATS_PATH.is_file():
        pytest.skip("token statistics not built")
    stats = TokenStats.load(TOKEN_STATS_PATH)
    assert stats.shape == (49, 1280) and stats.n == 4000 and (stats.var >= 0).all()
    assert stats.pooled.shape == (160, 1280)           # clean images the shift detector starts from
    assert TOKEN_STATS_PATH.stat().st_size < 700_000


def test_token_stats_round_trip_through_safetensors(tmp_path):
    stats = _stats(49, 8)
    back = TokenStats.load(stats.save(tmp_path / "s.safetensors"))
    assert back.n == 64 and torch.allclose(back.mean, stats.mean, atol=1e-3) and torch.allclose(back.var, stats.var, rtol=1e-3)
    assert back.pooled.shape == (64, 8) and torch.allclose(back.pooled, stats.pooled, atol=1e-3)
    older = TokenStats(stats.mean, stats.var, 64)                  # written before the pooled images were kept
    assert TokenStats.load(older.save(tmp_path / "old.safetensors")).pooled is None
    (tmp_path / "bad.safetensors").write_bytes(b"garbage")
    with pytest.raises(ValueError, match="not a token-statistics file"):
        TokenStats.load(tmp_path / "bad.safetensors")


def test_dropout_on_the_raw_token_only_ranks_energy():
    """The docstring's claim: Var of dropout(x) summed over channels is p/(1-p)·‖x‖² — energy again."""
    x = torch.randn(49, 16) * torch.linspace(0.1, 3, 49)[:, None]
    p = 0.3
    masks = (torch.rand(4000, 49, 16) >= p).float() / (1 - p)
    var = (masks * x).var(0).sum(-1)
    assert torch.allclose(var, p / (1 - p) * x.pow(2).sum(-1), rtol=0.1)
    ranks = lambda v: v.argsort().argsort().float()
    spearman = torch.corrcoef(torch.stack([ranks(var), ranks(x.norm(dim=-1))]))[0, 1]
    assert spearman > 0.99                                                   # the same ranking up to MC noise


def test_mc_dropout_is_not_a_monotone_function_of_token_norm():
    x = torch.rand(1, 49, 64)
    mc = score_mc_dropout(x, passes=32)
    hi, lo = int(mc[0].argmax()), int(mc[0].argmin())
    x[0, lo] *= 100.0                                           # the least uncertain token gets the largest norm
    mc2, energy = score_mc_dropout(x, passes=32), score_energy(x)
    assert energy[0, lo] > energy[0, hi]
    assert mc2[0, hi] > mc2[0, lo]                              # mc_dropout ranks the pair the other way round
    assert torch.allclose(mc2, mc, atol=1e-4)                   # (its score ignores the token's scale)


def test_mc_dropout_through_the_device_bridge_ignores_token_scale(tiny_device):
    x = torch.rand(2, 49, 32)
    scaled = x.clone()
    scaled[:, ::2] *= 50.0                                      # every other token 50x the norm
    a = score_mc_dropout(x, bridge=tiny_device.bridge, passes=16, seed=3)
    b = score_mc_dropout(scaled, bridge=tiny_device.bridge, passes=16, seed=3)
    assert torch.allclose(a, b, atol=1e-4)                      # energy would have moved every other token up
    assert not torch.equal(select_tokens(a, 0.5), select_tokens(score_energy(scaled), 0.5))
    assert ((a >= 0) & (a <= 1)).all() and a.std() > 0


def test_random_scorer_is_seeded():
    x = torch.randn(2, 49, 4)
    assert torch.equal(TOKEN_SCORERS["random"](x, seed=5), TOKEN_SCORERS["random"](x, seed=5))
    assert not torch.equal(TOKEN_SCORERS["random"](x, seed=5), TOKEN_SCORERS["random"](x, seed=6))


def test_select_tokens_keeps_the_ratio_in_the_chosen_direction_and_at_least_one():
    scores = torch.arange(49.0)[None].repeat(2, 1)
    most, least = select_tokens(scores, 0.25, "most"), select_tokens(scores, 0.25, "least")
    assert most.sum(1).tolist() == [12, 12] and most[0, 37:].all() and least[0, :12].all()
    assert select_tokens(scores, 0.001).sum(1).tolist() == [1, 1]
    assert select_tokens(scores, 1.0).all()


# -- the uplink packet ------------------------------------------------------------------------------
@st.composite
def uplink_cases(draw):
    n = draw(st.integers(1, 4))
    P = draw(st.integers(1, 49))
    C = draw(st.integers(1, 12))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    scale = draw(st.sampled_from([1e-3, 1.0, 300.0]))
    x = torch.randn(n, P, C, generator=g) * scale
    if draw(st.booleans()):
        x[0, 0] = 0.0                                           # an all-zero token (scale 0)
    ids = draw(st.lists(st.text(alphabet=st.characters(blacklist_categories=("Cs",)), min_size=1, max_size=12),
                        min_size=n, max_size=n, unique=True))
    samples = []
    for i in range(n):
        keep = torch.tensor(draw(st.lists(st.booleans(), min_size=P, max_size=P)))
        keep[draw(st.integers(0, P - 1))] = True
        samples.append(UplinkSample(ids[i], x[i], draw(TEXT), draw(TEXT), draw(st.floats(0, 1)),
                                    draw(st.floats(allow_nan=True, allow_infinity=False, width=32)),
                                    keep, mc=draw(TEXT)))
    cfg = UTSConfig(token_dtype=draw(st.sampled_from(["int8", "fp16"])), fill=draw(st.sampled_from(["mask", "mean", "zeros"])))
    return samples, cfg, _stats(P, C)


DEVICE_IDS = st.from_regex(wire.NAME_PATTERN, fullmatch=True).filter(wire.is_valid_name)


@FUZZ
@given(uplink_cases(), TEXT.filter(lambda s: not wire.is_valid_name(s)))
def test_an_uplink_from_a_device_id_that_is_not_a_plain_name_is_refused(case, device_id):
    samples, cfg, stats = case
    with pytest.raises(PacketError, match="not a plain name"):
        decode_uplink(build_uplink(samples, cfg, device_id=device_id, adapter_version="0"), stats=stats)


@FUZZ
@given(uplink_cases(), DEVICE_IDS, TEXT)
def test_uplink_packet_round_trips(case, device_id, version):
    samples, cfg, stats = case
    data = build_uplink(samples, cfg, device_id=device_id, adapter_version=version)
    batch = decode_uplink(data, stats=stats)
    P = samples[0].tokens.shape[0]
    assert (batch.device_id, batch.adapter_version, batch.fill, batch.token_dtype) == (device_id, version, cfg.fill, cfg.token_dtype)
    assert batch.sample_ids == [s.sample_id for s in samples]
    assert batch.questions == [s.question for s in samples] and batch.answers == [s.answer for s in samples]
    assert batch.mc == [s.mc for s in samples]
    assert batch.confidences == [float(np.float32(s.confidence)) for s in samples]
    for got, s in zip(batch.uncertainties, samples):
        assert (math.isnan(got) and math.isnan(s.uncertainty)) or got == np.float32(s.uncertainty)
    for i, s in enumerate(samples):
        assert torch.equal(batch.sent[i], s.keep)
        sent = s.tokens[s.keep]
        got = batch.tokens[i][s.keep]
        if cfg.token_dtype == "fp16":
            assert torch.equal(got, sent.half().float())
        else:
            scale = wire.decode(data).tensors["scales"][batch.sent[:i].sum():][: int(s.keep.sum())].float()[:, None]
            assert ((got - sent).abs() <= scale * 0.5001).all()
            absmax = sent.abs().amax(-1, keepdim=True)
            assert ((scale >= absmax / 127) & (scale <= absmax / 127 * 1.001 + 6e-8)).all()
        assert batch.keep[i].equal(s.keep if cfg.fill == "mask" else torch.ones(P, dtype=torch.bool))
    assert batch.images == [None] * len(samples) and batch.nbytes == len(data)


def test_fill_modes_produce_the_right_tensors():
    samples = _samples(2, C=8)
    stats = _stats(49, 8)
    by_fill = {fill: decode_uplink(build_uplink(samples, UTSConfig(fill=fill, token_dtype="fp16"), device_id="d",
                                                adapter_version="v"), stats=stats) for fill in ("mask", "mean", "zeros")}
    for i, s in enumerate(samples):
        dropped = ~s.keep
        for fill, b in by_fill.items():
            assert torch.equal(b.tokens[i][s.keep], s.tokens[s.keep].half().float()), fill
        assert (by_fill["mask"].tokens[i][dropped] == 0).all() and torch.equal(by_fill["mask"].keep[i], s.keep)
        assert (by_fill["zeros"].tokens[i][dropped] == 0).all() and by_fill["zeros"].keep[i].all()
        assert torch.equal(by_fill["mean"].tokens[i][dropped], stats.mean[dropped]) and by_fill["mean"].keep[i].all()
    # the cloud may override the packet's fill mode
    assert decode_uplink(build_uplink(samples, UTSConfig(), device_id="d", adapter_version="v"), fill="zeros").keep.all()


def test_int8_tokens_cost_a_byte_per_channel_and_err_by_at_most_half_a_step():
    x = torch.randn(25, 1280) * 3
    q, scale = quantize_int8(x)
    assert q.dtype == torch.int8 and scale.dtype == torch.float16
    assert ((q.float() * scale.float()[:, None] - x).abs() <= scale.float()[:, None] * 0.502).all()
    samples = _samples(1, C=1280)
    data = build_uplink(samples, UTSConfig(token_code="full"), device_id="d", adapter_version="v")
    assert len(data) <= sample_cost(25, 1280) + 2048 and len(data) < 0.15 * 49 * 1280 * 4


def test_decoded_uplink_feeds_the_clouds_bridge(tiny_device, tiny_cloud, prompter):
    from cdcca.model.answer import answer_batch

    tokens = torch.rand(4, 49, 32)
    qs = ["what color is the shape?"] * 4
    answers = answer_batch(tiny_device, prompter, tokens, qs)
    cfg = UTSConfig(selection="budget", budget=2, token_scorer="mc_dropout", mc_dropout_passes=4)
    planned = plan_uplink(tokens, qs, answers, [f"r0-{i}" for i in range(4)], cfg, bridge=tiny_device.bridge)
    batch = decode_uplink(build_uplink(planned, cfg, device_id="dev-1", adapter_version="v3"))
    assert len(batch) == 2 and batch.device_id == "dev-1" and batch.keep.sum(1).tolist() == [24, 24]
    out = tiny_cloud.bridge(batch.tokens, batch.keep)
    assert out.shape == (2, 2, 32) and torch.isfinite(out).all()


def test_image_is_never_uploaded_unless_allowed():
    img = (np.random.default_rng(0).random((64, 64, 3)) * 255).astype(np.uint8)
    samples = _samples(2, C=4)
    samples[1].image_png = png_bytes(img)
    plain = build_uplink(samples, UTSConfig(), device_id="d", adapter_version="v")
    assert not {"image_png", "image_sizes"} & set(wire.decode(plain).tensors)
    with_image = decode_uplink(build_uplink(samples, UTSConfig(allow_image=True), device_id="d", adapter_version="v"))
    assert with_image.images == [None, samples[1].image_png]


def test_build_uplink_refuses_inconsistent_samples():
    s = _samples(2, C=4)
    cfg = UTSConfig()
    with pytest.raises(ValueError, match="at least one"):
        build_uplink([], cfg, device_id="d", adapter_version="v")
    s[1].sample_id = s[0].sample_id
    with pytest.raises(ValueError, match="unique"):
        build_uplink(s, cfg, device_id="d", adapter_version="v")
    s = _samples(1, C=4)
    s[0].keep = torch.zeros(49, dtype=torch.bool)
    with pytest.raises(ValueError, match="keeps no token"):
        build_uplink(s, cfg, device_id="d", adapter_version="v")
    s = _samples(1, C=4)
    s[0].tokens[0, 0] = float("inf")
    with pytest.raises(ValueError, match="finite"):
        build_uplink(s, cfg, device_id="d", adapter_version="v")


@pytest.fixture(scope="module")
def packet() -> bytes:
    return build_uplink(_samples(3, C=8), UTSConfig(), device_id="d", adapter_version="v")


@FUZZ
@given(st.data())
def test_truncated_or_bit_flipped_uplink_packets_raise_packet_error(packet, data):
    if data.draw(st.booleans()):
        bad = packet[: data.draw(st.integers(0, len(packet) - 1))]
    else:
        i = data.draw(st.integers(0, len(packet) - 1))
        bad = packet[:i] + bytes([packet[i] ^ data.draw(st.integers(1, 255))]) + packet[i + 1:]
    try:
        decode_uplink(bad)
    except PacketError:
        return
    # a flip inside the header's JSON whitespace padding may leave the same header: then nothing changed
    (n,) = struct.unpack("<Q", packet[:8])
    assert json.loads(bad[8:8 + n]) == json.loads(packet[8:8 + n]) and bad[8 + n:] == packet[8 + n:]


def _reencode(packet: bytes, tensors=None, meta=None, drop=()) -> bytes:
    p = wire.decode(packet)
    t = {k: v for k, v in p.tensors.items() if k not in drop}
    return wire.encode("uplink", {**t, **(tensors or {})}, {**p.meta, **(meta or {})})


def _text(entries) -> torch.Tensor:
    return torch.frombuffer(bytearray(json.dumps(entries).encode()), dtype=torch.uint8)


def _entries(n=3):
    return [{"id": f"s{i}", "q": "q", "a": "a", "mc": ""} for i in range(n)]


@pytest.mark.parametrize("mutation, message", [
    (lambda p: _reencode(p, {"positions": torch.full((72,), 49, dtype=torch.uint8)}), "position is ≥"),
    (lambda p: _reencode(p, {"positions": torch.zeros(72, dtype=torch.uint8)}), "ascending"),
    (lambda p: _reencode(p, {"counts": torch.tensor([24, 24, 23], dtype=torch.int32)}), "shape"),
    (lambda p: _reencode(p, {"counts": torch.tensor([50, 22, 0], dtype=torch.int32)}), "1..49"),
    (lambda p: _reencode(p, {"counts": torch.tensor([24, 24, 24], dtype=torch.int64)}), "counts"),
    (lambda p: _reencode(p, {"scales": -torch.ones(72, dtype=torch.float16)}), "scales"),
    (lambda p: _reencode(p, {"tokens": torch.zeros(72, 8, dtype=torch.float16)}), "tokens"),
    (lambda p: _reencode(p, {"tokens": torch.zeros(72, 9, dtype=torch.int8)}), "shape"),
    (lambda p: _reencode(p, {"confidence": torch.zeros(2)}), "confidence"),
    (lambda p: _reencode(p, {"text": _text(_entries(2))}), "list of 3"),
    (lambda p: _reencode(p, {"text": _text([{"id": "s0", "q": 1, "a": "", "mc": ""}] + _entries(2))}), "strings"),
    (lambda p: _reencode(p, {"text": _text([_entries(1)[0]] * 3)}), "unique"),
    (lambda p: _reencode(p, {"text": torch.tensor([0xFF, 0xFE], dtype=torch.uint8)}), "UTF-8 JSON"),
    (lambda p: _reencode(p, drop=("scales",)), "layout"),
    (lambda p: _reencode(p, {"extra": torch.zeros(1)}), "layout"),
    (lambda p: _reencode(p, meta={"n_samples": "4"}), "counts.*shape"),
    (lambda p: _reencode(p, meta={"n_samples": "03"}), "n_samples"),
    (lambda p: _reencode(p, meta={"token_dim": "9"}), "tokens.*shape"),
    (lambda p: _reencode(p, meta={"n_tokens": "70000"}), "n_tokens"),
    (lambda p: _reencode(p, meta={"n_tokens": "300", "uts.format": "2"}), "n_tokens"),
    (lambda p: _reencode(p, meta={"token_dtype": "fp16"}), "does not match code"),
    (lambda p: _reencode(p, meta={"fill": "noise"}), "fill"),
    (lambda p: _reencode(p, meta={"uts.format": "4"}), "upgrade"),
    (lambda p: _reencode(p, meta={"n_samples": str(2**20), "token_dim": "4096"}), "expand beyond"),
    (lambda p: _reencode(p, {"image_sizes": torch.tensor([3, 0, 0], dtype=torch.int32),
                             "image_png": torch.tensor([1, 2, 3], dtype=torch.uint8)}), "PNG"),
    (lambda p: wire.encode("update", wire.decode(p).tensors, wire.decode(p).meta), "expected a 'uplink'"),
])
def test_rehashed_uplink_packets_with_inconsistent_content_raise_packet_error(packet, mutation, message):
    with pytest.raises(PacketError, match=message):
        decode_uplink(mutation(packet))


# -- evaluation helper and CLI ------------------------------------------------------------------------
def test_auroc_helper_is_correct_on_known_cases():
    assert auroc([0.1, 0.4, 0.35, 0.8], [False, False, True, True]) == pytest.approx(0.75)
    assert auroc([1, 2, 3, 4], [False, False, True, True]) == 1.0
    assert auroc([4, 3, 2, 1], [False, False, True, True]) == 0.0
    assert auroc([0.5] * 4, [False, True, False, True]) == 0.5          # ties count half
    assert math.isnan(auroc([0.1, 0.2], [True, True]))
    rng = np.random.default_rng(0)
    s, y = rng.random(300), rng.random(300) < 0.3
    pairs = np.mean([(a > b) + 0.5 * (a == b) for a in s[y] for b in s[~y]])
    assert auroc(s, y) == pytest.approx(pairs)


def test_packet_inspect_prints_the_index_and_fails_with_exit_2_on_a_bad_file(tmp_path, packet):
    from typer.testing import CliRunner

    from cdcca.cli.main import app

    good, bad = tmp_path / "up.pkt", tmp_path / "bad.pkt"
    good.write_bytes(packet)
    bad.write_bytes(packet[:-5])
    runner = CliRunner()
    res = runner.invoke(app, ["packet", "inspect", str(good), "--json"])
    assert res.exit_code == 0 and json.loads(res.stdout)["meta"]["n_samples"] == "3"
    res = runner.invoke(app, ["packet", "inspect", str(bad)])
    assert res.exit_code == 2 and "error" in res.output and len(res.output.strip().splitlines()) == 1


def test_uts_benchmark_reports_auroc_bytes_ratios_and_overhead_with_a_tiny_device(tiny_device, prompter):
    from cdcca.bench.uts import CODES, run_bench

    def features(domain):      # stand-in 32-dim tokens per test image, different per domain
        return torch.rand(1000, 49, 32, generator=torch.Generator().manual_seed(len(str(domain))))

    res = run_bench(8, model=tiny_device, prompter=prompter, tokens_for=features, stats=_stats(49, 32),
                    cfg=UTSConfig(selection="threshold", threshold=-1.0), repeats=1, batch_size=2, keep_ratios=(0.5, 1.0))
    assert res["n"] == 8 and set(res["auroc"]) == {*SAMPLE_SCORERS, "view_consistency"} and res["default"]["upload_rate"] == 1.0
    assert set(res["bytes_per_uploaded_sample"]) == set(TOKEN_SCORERS)
    assert res["bytes_per_uploaded_sample"]["ood"]["0.5"] < res["bytes_per_uploaded_sample"]["ood"]["1"]
    for key in ("ratio_full_tokens", "ratio_png", "ratio_jpeg224", "bytes_per_upload", "png_64_bytes", "jpeg_64_bytes",
                "png_224_bytes", "jpeg_224_bytes"):
        assert res[key] > 0, key
    assert res["bytes_per_upload"] == res["default"]["bytes_per_uploaded_sample"]
    assert res["png_224_bytes"] > res["png_64_bytes"] and res["jpeg_224_bytes"] > res["jpeg_64_bytes"]
    assert set(res["codes"]) == set(CODES) and all(r["code_used"] == "full-int8" for r in res["codes"].values())
    assert res["timing"]["overhead"] > 0 and json.dumps(res)
