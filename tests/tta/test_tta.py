"""Device-only test-time adaptation baselines: each moves only what its paper names, CoTTA's mean
teacher and stochastic restore behave as specified, and no baseline can see a stream answer."""

import math

import numpy as np
import pytest
import torch

from cdcca.tta import EATA, CoTTA, CoTTAConfig, EATAConfig, Tent, TentConfig, norm_parameters
from cdcca.tta.common import adapter_parameters


def _batch(n=8, dim=32, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = ["what color is the shape?", "is there a circle in the image?", "what shape is in the image?", "is it red?"]
    return torch.randn(n, 49, dim, generator=g), [qs[i % len(qs)] for i in range(n)]


def _changed(model, before):
    return {n for n, p in model.named_parameters() if not torch.equal(p.detach(), before[n])}


def _snapshot(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def test_norm_parameters_are_the_llm_rmsnorms_and_bridge_layernorms(tiny_device):
    names = set(norm_parameters(tiny_device))
    assert names and all(n.endswith(("norm.weight", ".weight", ".bias")) for n in names)
    assert any(n.startswith("bridge.") and "ln_" in n for n in names)          # bridge LayerNorms
    assert any("input_layernorm" in n for n in names)                          # LLM RMSNorms
    assert not any("lora_" in n or "proj" in n or "queries" in n for n in names)


def test_tent_moves_only_the_normalisation_affines(tiny_device, prompter):
    before = _snapshot(tiny_device)
    tent = Tent(tiny_device, prompter, TentConfig(lr=1e-2))
    tokens, qs = _batch()
    probs = tent.step(tokens, qs)
    assert probs.shape == (8, len(prompter.candidates)) and torch.allclose(probs.sum(-1), torch.ones(8))
    changed = _changed(tiny_device, before)
    assert changed and changed <= set(norm_parameters(tiny_device))


def test_tent_lowers_the_entropy_it_minimises(tiny_device, prompter):
    from cdcca.tta.common import candidate_logits, entropy

    tokens, qs = _batch()
    tent = Tent(tiny_device, prompter, TentConfig(lr=5e-2, steps=10))
    with torch.no_grad():
        h0 = entropy(candidate_logits(tiny_device, prompter, tokens, qs)).mean()
    tent.step(tokens, qs)
    with torch.no_grad():
        h1 = entropy(candidate_logits(tiny_device, prompter, tokens, qs)).mean()
    assert h1 < h0


def test_eata_moves_only_the_normalisation_affines_and_uses_fisher(tiny_device, prompter):
    from cdcca.akd.source_set import random_source_set

    before = _snapshot(tiny_device)
    eata = EATA(tiny_device, prompter, random_source_set(32, prompter.candidates),
                EATAConfig(lr=1e-2, e_margin_coeff=10.0, fisher_samples=8))   # a margin every sample passes
    assert set(eata.fisher) == set(norm_parameters(tiny_device))
    assert any(f.sum() > 0 for f in eata.fisher.values())
    eata.step(*_batch())
    changed = _changed(tiny_device, before)
    assert changed and changed <= set(norm_parameters(tiny_device))


def test_eata_keeps_only_reliable_non_redundant_samples(tiny_device, prompter):
    eata = EATA(tiny_device, prompter, None, EATAConfig(fisher_alpha=0.0))
    assert eata.e_margin == pytest.approx(0.4 * math.log(13))
    probs = torch.full((4, 13), 0.01)
    for i, c in enumerate([0, 0, 1, 2]):
        probs[i, c] = 1.0
    probs = probs / probs.sum(-1, keepdim=True)
    ent = torch.tensor([0.1, 0.2, 0.3, 5.0])                # the last one is unreliable
    assert eata.select(probs, ent).tolist() == [0, 1, 2]
    # the running mean now leans to answer 0: a fresh answer-0 prediction is redundant, answer 2 is not
    assert eata.select(probs[[0, 3]], torch.tensor([0.1, 0.1])).tolist() == [1]


def test_cotta_adapts_every_adapter_and_follows_its_mean_teacher(tiny_device, prompter):
    cotta = CoTTA(tiny_device, prompter, CoTTAConfig(lr=1e-2, restore_p=0.0, threshold=1.1, views=2))
    teacher_before = {k: p.detach().clone() for k, p in cotta.teacher_params.items()}
    before = _snapshot(tiny_device)
    cotta.step(*_batch())
    assert cotta.augmented_batches == 1                     # threshold above any confidence: always augmented
    changed = _changed(tiny_device, before)
    assert changed and changed <= set(adapter_parameters(tiny_device))
    for k, p in cotta.params.items():                      # teacher = 0.999·teacher + 0.001·student
        expected = 0.999 * teacher_before[k] + 0.001 * p.detach()
        assert torch.allclose(cotta.teacher_params[k], expected, atol=1e-6)


def test_cotta_stochastic_restore_resets_the_expected_share(tiny_device, prompter):
    cotta = CoTTA(tiny_device, prompter, CoTTAConfig(restore_p=0.3))
    with torch.no_grad():
        for p in cotta.params.values():
            p.add_(1.0)
    cotta._restore()
    total = sum(p.numel() for p in cotta.params.values())
    back = sum(int(torch.isclose(p, cotta.source[k]).sum()) for k, p in cotta.params.items())
    assert back == cotta.restored
    assert abs(back / total - 0.3) < 0.02                  # binomial: thousands of entries


def test_a_baseline_never_sees_a_stream_answer(tiny_device, prompter, monkeypatch):
    """Whatever answers the stream holds, the device adapts to the same weights and answers the same."""
    import cdcca.bench.baselines as bl
    from cdcca.config import resolve

    class Stream:
        def __init__(self, spec):
            self.spec = spec

        def chunk(self, rnd):
            tokens, qs = _batch(8, seed=rnd)
            gold = ["red"] * 8 if self.spec["answers"] == "true" else ["no"] * 8
            return tokens, qs, gold, [f"d-r{rnd}-q{i}" for i in range(8)], "pixelate:5"

    def fake_measure(row, *a, **k):
        row.update(heldout={"pixelate:5": 0.0}, heldout_mc=0.0, source_mc=0.0)

    monkeypatch.setattr(bl, "measure_heldout", fake_measure)
    results = {}
    for answers in ("true", "garbage"):
        monkeypatch.setattr(bl, "SimulatedTraffic", lambda spec, a=answers: Stream({**spec, "answers": a}))
        model = __import__("cdcca.model.pair", fromlist=["tiny_model"]).tiny_model("device", seed=0)
        cfg = resolve(sets=['data.domains="pixelate:5"', "stream.rounds_per_domain=2"])
        for method in ("tent", "eata", "cotta"):
            base = bl.BaselineConfig(method=method, batch=4, eata=EATAConfig(e_margin_coeff=10.0, fisher_alpha=0.0))
            res = bl.run_device_only(cfg, base, model, prompter, data=None)
            results[(answers, method)] = (_snapshot(model), [r["online_mc"] for r in res["rounds"]])
    for method in ("tent", "eata", "cotta"):
        w_true, mc_true = results[("true", method)]
        w_garbage, mc_garbage = results[("garbage", method)]
        assert all(torch.equal(w_true[n], w_garbage[n]) for n in w_true)
        assert mc_true != mc_garbage or mc_true == [0.0, 0.0]   # scoring does use them


def test_baseline_config_rejects_an_unknown_method():
    from cdcca.bench.baselines import BaselineConfig

    with pytest.raises(ValueError, match="tent"):
        BaselineConfig(method="sar")


def test_encoder_statistics_move_and_weights_do_not():
    from cdcca.model.encoder import load_encoder
    from cdcca.tta import EncoderStats

    enc = load_encoder()
    stats = EncoderStats(enc, batch_size=4)
    bn = stats.norms[0]
    mean0, weights0 = bn.running_mean.clone(), [p.clone() for p in enc.parameters()][:5]
    images = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    stats.observe(images)
    assert not torch.allclose(bn.running_mean, mean0)
    assert all(torch.equal(a, b) for a, b in zip(weights0, list(enc.parameters())[:5]))
    assert not enc.training and not bn.training
    assert stats.encode(images[:2]).shape == (2, 49, 1280)


def test_encoder_statistics_prior_blends_source_and_estimate():
    from cdcca.model.encoder import load_encoder
    from cdcca.tta import EncoderStats

    images = np.random.default_rng(0).integers(0, 255, (4, 64, 64, 3), dtype=np.uint8)
    full = EncoderStats(load_encoder(), batch_size=4)
    full.observe(images)
    half = EncoderStats(load_encoder(), batch_size=4, source_weight=0.5)
    source_mean = half.norms[3].running_mean.clone()
    half.observe(images)
    assert torch.allclose(half.norms[3].running_mean, 0.5 * source_mean + 0.5 * full.norms[3].running_mean, atol=1e-5)
    with pytest.raises(ValueError, match="source_weight"):
        EncoderStats(load_encoder(), source_weight=1.5)
