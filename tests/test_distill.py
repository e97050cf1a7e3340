"""AKD on tiny models: one teacher pass per sample, gradients only into adapters, switchable terms."""

import pytest
import torch

from cdcca.adapter_state import state_hash
from cdcca.distill import AKD, AKDConfig, Aligner, ReplayBuffer, wavelet_highband_l1
from cdcca.model.mllm import adapter_state, is_adapter_key

QUESTIONS = ["what color is the shape?", "is there a circle in the image?", "what shape is present?",
             "is the shape red?", "what is the blue shape?"]


def uplink(n=5):
    tokens = torch.randn(n, 49, 32)
    keep = torch.ones(n, 49, dtype=torch.bool)
    keep[:, 25:] = False
    return tokens, keep, QUESTIONS[:n], [f"s{i}" for i in range(n)]


def test_teacher_runs_once_per_sample_however_many_epochs(tiny_device, tiny_cloud, prompter):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(epochs=3, batch_size=2))
    records = akd.teacher_pass(*uplink(5), batch_size=2)
    assert akd.teacher_forward_calls == 3 and akd.teacher_samples == 5
    akd.distill("d0", adapter_state(tiny_device), records)
    assert akd.teacher_forward_calls == 3 and akd.teacher_samples == 5     # epochs reuse the cache


def test_gradients_reach_student_adapters_only(tiny_device, tiny_cloud, prompter):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig())
    records = akd.teacher_pass(*uplink(3))
    teacher_before = {n: p.clone() for n, p in tiny_cloud.named_parameters()}
    terms = akd.loss_terms(records, Aligner(32, 32))
    assert set(terms) == {"ce", "kl", "mse", "wave"}
    sum(terms.values()).backward()
    for name, p in tiny_device.named_parameters():
        assert (p.grad is not None) == (is_adapter_key(name) and p.grad is not None)
        if not is_adapter_key(name):
            assert p.grad is None, name
    assert all(p.grad is None for p in tiny_cloud.parameters())
    assert all(torch.equal(p, teacher_before[n]) for n, p in tiny_cloud.named_parameters())


def test_distill_starts_from_the_given_adapters_and_changes_them(tiny_device, tiny_cloud, prompter):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(epochs=1, batch_size=4))
    base = {k: v + 0.01 for k, v in adapter_state(tiny_device).items()}
    new, stats = akd.distill("d0", base, akd.teacher_pass(*uplink(4)))
    assert stats.steps == 1 and stats.samples == 4
    assert state_hash(new) != state_hash(base)
    assert set(new) == set(base)


@pytest.mark.parametrize("ablation,terms", [("ce", {"ce"}), ("ce+mse", {"ce", "mse"}),
                                            ("ce+mse+wave", {"ce", "mse", "wave"}), ("full", {"ce", "mse", "wave", "kl"})])
def test_each_loss_term_can_be_switched_off(tiny_device, tiny_cloud, prompter, ablation, terms):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig.ablation(ablation))
    assert set(akd.loss_terms(akd.teacher_pass(*uplink(2)), Aligner(32, 32))) == terms


def test_wavelet_term_ignores_smooth_offsets_but_sees_high_frequencies():
    t = torch.zeros(2, 32, 8)
    smooth = t + 1.0            # same energy, high frequencies only at the zero-padded edges
    zigzag = t + torch.tensor([1.0, -1.0]).repeat(16)[None, :, None]
    assert wavelet_highband_l1(zigzag, t) > 2 * wavelet_highband_l1(smooth, t)


def test_replay_buffer_is_bounded():
    buf = ReplayBuffer(capacity=3)
    buf.add(list(range(10)))
    assert len(buf.items) == 3 and buf.seen == 10
    assert len(buf.sample(5)) == 3
