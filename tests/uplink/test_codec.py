"""The compact uplink: token codes on a shared channel basis, the packet naming its code and basis,
old (format-1) packets still decoding, and the bytes an uploaded sample costs at the real token width."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from cdcca import wire
from cdcca.uplink import (
    TokenBasis,
    UplinkSample,
    UTSConfig,
    build_uplink,
    decode_uplink,
    fit_token_basis,
    pack_int4,
    parse_code,
    quantize_codes,
    sample_cost,
    select_tokens,
    unpack_int4,
)
from cdcca.uplink.codec import (
    EC_STEP,
    bridge_metric,
    code_span_factors,
    dequantize_int8,
    entropy_decode,
    entropy_encode,
)
from cdcca.wire import PacketError

torch.set_num_threads(2)
OLD = Path(__file__).resolve().parents[1] / "fixtures" / "uplink"

COMPACT = UTSConfig(token_code="pca128-int4")     # the opt-in compact code (the default sends full tokens)


@pytest.fixture(scope="module")
def basis() -> TokenBasis:
    """A basis fitted on random low-rank tokens of the real width, 1280, in the metric of two random
    bridge projections (no packaged file, no download)."""
    g = torch.Generator().manual_seed(0)
    mix = torch.randn(96, 1280, generator=g)
    tokens = torch.relu(torch.randn(1500, 96, generator=g) @ mix / 10 + 0.5)
    return fit_token_basis(tokens, k=128, metric=bridge_metric(torch.randn(32, 1280, generator=g),
                                                                 torch.randn(32, 1280, generator=g)))


def _random_basis(seed: int, k: int = 64, C: int = 1280) -> TokenBasis:
    q = torch.linalg.qr(torch.randn(C, k, generator=torch.Generator().manual_seed(seed)))[0].T
    return TokenBasis(torch.zeros(C), q, q)


def _samples(n: int, C: int = 1280, seed: int = 0, tokens: torch.Tensor | None = None) -> list[UplinkSample]:
    g = torch.Generator().manual_seed(seed)
    x = tokens if tokens is not None else torch.rand(n, 49, C, generator=g) * 6
    keep = select_tokens(torch.rand(n, 49, generator=g), 0.5)
    return [UplinkSample(f"s{i}", x[i], "what color is the shape?", "red", 0.5, 0.1, keep[i], mc="red")
            for i in range(n)]


def _meta(packet: bytes) -> dict[str, str]:
    return wire.decode(packet).meta


def test_code_names_parse_and_unknown_ones_are_refused():
    assert parse_code("pca64-int8").k == 64 and parse_code("pca128-int4").bits == 4
    assert parse_code("full-fp16").bytes_per_token(1280) == 2560
    assert parse_code("pca64-int8").bytes_per_token(1280) == 70 and parse_code("pca128-int4").bytes_per_token(1280) == 70
    for bad in ("pca0-int8", "pca64-int2", "PCA64-int8", "full-int4", "pca64"):
        with pytest.raises(ValueError, match="token code"):
            parse_code(bad)
    with pytest.raises(ValueError, match="token_code"):
        UTSConfig(token_code="zip")


def test_decoding_inverts_encoding_on_the_kept_span_and_the_basis_is_named_by_its_content(basis):
    E, D = basis.encoder, basis.decoder
    assert E.shape == D.shape == (128, 1280) and torch.allclose(E @ D.T, torch.eye(128), atol=2e-2)
    assert _random_basis(1).digest != basis.digest and len(basis.digest) == 16
    again = TokenBasis(basis.mean.clone(), E.clone(), D.clone(), basis.n)
    assert again.digest == basis.digest


def test_a_full_rank_code_reconstructs_tokens_exactly_up_to_fp16():
    g = torch.Generator().manual_seed(4)
    x = torch.rand(600, 24, generator=g) * 6
    for metric in (None, bridge_metric(torch.randn(8, 24, generator=g))):
        b = fit_token_basis(x[:500], k=24, metric=metric)
        coeffs, norms = b.project(x[500:], 24)
        assert norms.dtype == torch.float16 and norms.shape == (100, 2)
        rec = b.reconstruct(coeffs, norms)
        assert ((rec - x[500:]).norm(dim=-1) / x[500:].norm(dim=-1)).max() < 0.02


def test_int8_and_int4_codes_err_by_at_most_half_a_step():
    x = torch.randn(300, 65) * 5
    x[0] = 0.0
    for bits, levels in ((8, 127), (4, 7)):
        q, scale = quantize_codes(x, bits)
        codes = q if bits == 8 else unpack_int4(q, 65)
        assert codes.abs().max() <= levels
        err = (dequantize_int8(codes, scale) - x).abs()
        assert (err <= scale.float()[:, None] * 0.5001 + 1e-7).all()
        assert (scale.float() >= x.abs().amax(-1) / levels).all()


def test_int4_packing_round_trips_every_nibble_and_odd_widths():
    q = torch.arange(-8, 8, dtype=torch.int8).repeat(3, 1)[:, :15]
    packed = pack_int4(q)
    assert packed.dtype == torch.uint8 and packed.shape == (3, 8)
    assert torch.equal(unpack_int4(packed, 15), q)


@pytest.mark.parametrize("code", ["pca64-int8", "pca128-int4", "pca32-int8"])
def test_pca_codes_round_trip_within_the_quantization_bound(basis, code):
    k = parse_code(code).k
    samples = _samples(4)
    batch = decode_uplink(build_uplink(samples, UTSConfig(token_code=code), device_id="d", adapter_version="v",
                                       basis=basis), basis=basis)
    assert batch.code == code
    levels = 127 if code.endswith("int8") else 7
    gain = torch.linalg.matrix_norm(basis.decoder[:k], 2)       # ‖Δtoken‖ ≤ σ · ‖decoder‖₂ · ‖Δcodes‖₂
    for i, s in enumerate(samples):
        sent = s.tokens[s.keep]
        coeffs, norms = basis.project(sent, k)
        exact = basis.reconstruct(coeffs, norms)              # what an unquantized code would give
        err = (batch.tokens[i][s.keep] - exact).norm(dim=-1)
        step = coeffs.abs().amax(-1) / levels
        assert (err <= norms[:, 1].float() * gain * step * 0.5 * k ** 0.5 * 1.02 + 1e-3).all(), code
        assert torch.equal(batch.sent[i], s.keep)


def test_the_packet_names_its_code_and_basis_and_full_packets_name_no_basis(basis):
    samples = _samples(2)
    meta = _meta(build_uplink(samples, COMPACT, device_id="d", adapter_version="v", basis=basis))
    assert (meta["code"], meta["basis"], meta["uts.format"]) == ("pca128-int4", basis.digest, "3")
    meta = _meta(build_uplink(samples, UTSConfig(token_code="full"), device_id="d", adapter_version="v", basis=basis))
    assert meta["code"] == "full-int8" and "basis" not in meta
    narrow = [UplinkSample("n", torch.rand(49, 16), "q", "a", 0.5)]          # another width: full channels
    assert _meta(build_uplink(narrow, COMPACT, device_id="d", adapter_version="v"))["code"] == "full-int8"


def _recoded(packet: bytes, **meta: str) -> bytes:
    p = wire.decode(packet)
    return wire.encode("uplink", p.tensors, {**p.meta, **meta})


def test_a_packet_coded_on_another_basis_or_with_an_unknown_code_is_refused_in_one_line(basis):
    packet = build_uplink(_samples(2), COMPACT, device_id="d", adapter_version="v", basis=basis)
    other = _random_basis(9)
    for bad, match in [(packet, "token basis"), (_recoded(packet, code="pca64-int9"), "unknown token code"),
                       (_recoded(packet, code="vq256-int8"), "unknown token code"),
                       (_recoded(packet, code="pca96-int4"), "codes.*shape")]:
        with pytest.raises(PacketError, match=match) as err:
            decode_uplink(bad, basis=other if bad is packet else basis)
        assert "\n" not in str(err.value)
    with pytest.raises(PacketError, match="does not match code"):
        decode_uplink(_recoded(packet, token_dtype="fp16"), basis=basis)
    with pytest.raises(PacketError, match="names no code"):
        decode_uplink(_recoded(packet, **{"uts.format": "1"}), basis=basis)


@pytest.mark.parametrize("dtype", ["int8", "fp16"])
def test_format1_packets_written_by_the_previous_cdcca_still_decode(dtype):
    """tests/fixtures/uplink/format1-*.pkt were written by the commit before codes existed (git archive)."""
    g = torch.Generator().manual_seed(27)
    x = torch.randn(2, 49, 16, generator=g) * 2
    keep = select_tokens(torch.rand(2, 49, generator=g), 0.5)
    data = (OLD / f"format1-{dtype}.pkt").read_bytes()
    assert _meta(data)["uts.format"] == "1" and "code" not in _meta(data)
    batch = decode_uplink(data)
    assert batch.code == f"full-{dtype}" and batch.sample_ids == ["old-0", "old-1"] and batch.device_id == "dev-old"
    assert torch.equal(batch.sent, keep)
    tol = x.abs().amax(-1, keepdim=True) / 127 * 0.51 if dtype == "int8" else 2e-3
    assert ((batch.tokens[keep] - x[keep]).abs() <= (tol[keep] if dtype == "int8" else tol)).all()


def test_an_uploaded_sample_costs_at_most_2_kib_with_the_compact_code_on_the_real_token_width(basis):
    cfg = UTSConfig(token_code="pca128-int4")
    samples = _samples(16)
    packet = build_uplink(samples, cfg, device_id="dev-1", adapter_version="12", basis=basis)
    assert len(packet) / len(samples) <= 2048
    assert sample_cost(25, 1280, code=cfg.token_code) <= 25 * 71 + 200 < 2048
    full = build_uplink(samples, UTSConfig(token_code="full"), device_id="dev-1", adapter_version="12", basis=basis)
    assert len(full) > 15 * len(packet)


def test_packed_samples_make_the_same_packet_as_dense_ones(basis):
    dense = _samples(3)
    packed = [UplinkSample(s.sample_id, s.tokens[s.keep].clone(), s.question, s.answer, s.confidence, s.uncertainty,
                           None, s.mc, positions=s.keep.nonzero().flatten(), grid=49) for s in dense]
    a, b = (decode_uplink(build_uplink(x, COMPACT, device_id="d", adapter_version="v", basis=basis), basis=basis)
            for x in (dense, packed))
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.sent, b.sent)
    bad = UplinkSample("x", torch.rand(3, 1280), "q", "a", 0.5, positions=torch.tensor([4, 2, 9]), grid=49)
    with pytest.raises(ValueError, match="ascending"):
        build_uplink([bad], COMPACT, device_id="d", adapter_version="v", basis=basis)


EC = UTSConfig(token_code="pca128-ec")


def test_the_entropy_code_rounds_every_coefficient_on_one_step_and_names_itself(basis):
    assert parse_code("pca256-ec").entropy and parse_code("pca256-ec").k == 256 and not parse_code("pca64-int8").entropy
    samples = _samples(6)
    packet = build_uplink(samples, EC, device_id="d", adapter_version="v", basis=basis)
    meta, tensors = _meta(packet), wire.decode(packet).tensors
    assert (meta["code"], meta["basis"]) == ("pca128-ec", basis.digest) and "scales" not in tensors
    batch = decode_uplink(packet, basis=basis)
    for i, s in enumerate(samples):
        coeffs, norms = basis.project(s.tokens[s.keep], 128)
        assert torch.equal(batch.tokens[i][s.keep], basis.reconstruct((coeffs / EC_STEP).round() * EC_STEP, norms))


def test_the_entropy_code_spends_fewer_bytes_on_narrow_components_than_a_per_token_scale(basis):
    """Coefficients of real tokens fall off with the component (a PCA); the LZMA stream, laid out one
    component after another, costs far less than int8 codes of the same step would."""
    g = torch.Generator().manual_seed(3)
    coeffs = torch.randn(1200, 128, generator=g) * torch.logspace(1.4, -0.3, 128)   # std 25 → 0.5
    stream = entropy_encode(coeffs)
    assert stream.numel() < 0.6 * coeffs.numel()                # int8 codes: 1 byte each
    assert torch.equal(entropy_decode(stream, 1200, 128), (coeffs / EC_STEP).round().clamp(-127, 127) * EC_STEP)


def test_a_damaged_or_oversized_entropy_stream_is_refused_in_one_line(basis):
    packet = build_uplink(_samples(3), EC, device_id="d", adapter_version="v", basis=basis)
    p = wire.decode(packet)
    stream = p.tensors["codes"]
    bomb = entropy_encode(torch.zeros(4096, 128))                 # expands far beyond what the layout allows
    for codes, match in [(stream[: len(stream) // 2], "codes"), (torch.cat([stream, stream[:5]]), "codes"),
                         (bomb, "exactly"), (torch.full((40,), 7, dtype=torch.uint8), "codes"),
                         (stream.to(torch.int16), "uint8")]:
        bad = wire.encode("uplink", {**p.tensors, "codes": codes}, p.meta)
        with pytest.raises(PacketError, match=match) as err:
            decode_uplink(bad, basis=basis)
        assert "\n" not in str(err.value)




def test_a_change_confined_to_the_codes_span_reads_a_real_token_as_its_rebuilt_form(basis):
    g = torch.Generator().manual_seed(8)
    delta = torch.randn(32, 1280, generator=g) / 40
    gamma, beta = 1 + 0.2 * torch.rand(1280, generator=g), 0.1 * torch.randn(1280, generator=g)
    tokens = torch.rand(20, 1280, generator=g) * 6
    coeffs, norms = basis.project(tokens, 128)
    real = (tokens - norms[:, :1].float()) / norms[:, 1:].float()                                 # x̂
    rebuilt = (basis.reconstruct(coeffs, norms) - norms[:, :1].float()) / norms[:, 1:].float()  # r̂
    a, b = code_span_factors(gamma, parse_code("pca128-ec"), basis)
    confined = delta @ a @ b
    on_real, on_rebuilt = (gamma * real + beta) @ confined.T, (gamma * rebuilt + beta) @ delta.T
    offset = on_rebuilt - on_real                          # the same constant for every token (the bias absorbs it)
    assert torch.allclose(offset, offset[:1].expand_as(offset), atol=2e-3 * on_rebuilt.abs().max())
    free = (gamma * real + beta) @ delta.T
    assert ((free - on_rebuilt) - (free - on_rebuilt)[:1]).norm() > 0.05 * on_rebuilt.norm()    # a free change reads more


def test_format2_packets_written_by_the_previous_cdcca_still_decode():
    """tests/fixtures/uplink/format2-int8.pkt was written by the commit before grids beyond 256 tokens (format 3)."""
    g = torch.Generator().manual_seed(27)
    x = torch.randn(2, 49, 16, generator=g) * 2
    keep = select_tokens(torch.rand(2, 49, generator=g), 0.5)
    data = (OLD / "format2-int8.pkt").read_bytes()
    assert _meta(data)["uts.format"] == "2" and wire.decode(data).tensors["positions"].dtype == torch.uint8
    batch = decode_uplink(data)
    assert batch.code == "full-int8" and batch.sample_ids == ["old-0", "old-1"] and torch.equal(batch.sent, keep)
    tol = x.abs().amax(-1, keepdim=True) / 127 * 0.51
    assert ((batch.tokens[keep] - x[keep]).abs() <= tol[keep]).all()


@pytest.mark.parametrize("P, dtype", [(256, torch.uint8), (257, torch.uint16), (576, torch.uint16)])
def test_an_encoder_with_more_than_256_tokens_an_image_round_trips(P, dtype):
    """A ViT at 336 px has 576 patch tokens: their positions travel as uint16; 256 and fewer stay one byte."""
    g = torch.Generator().manual_seed(P)
    x = torch.randn(2, P, 8, generator=g)
    keep = select_tokens(torch.rand(2, P, generator=g), 0.5)
    keep[:, -1] = True                        # the last grid position travels
    samples = [UplinkSample(f"s{i}", x[i], "q?", "a", 0.5, 0.5, keep[i], mc="a") for i in range(2)]
    data = build_uplink(samples, UTSConfig(token_code="full", token_dtype="fp16"), device_id="d", adapter_version="0")
    assert wire.decode(data).tensors["positions"].dtype == dtype and _meta(data)["uts.format"] == "3"
    batch = decode_uplink(data)
    assert torch.equal(batch.sent, keep) and torch.equal(batch.tokens[keep], x[keep].half().float())
    assert sample_cost(10, 8, "fp16", n_tokens=P) - sample_cost(10, 8, "fp16", n_tokens=49) == (10 if P > 256 else 0)
