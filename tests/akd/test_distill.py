"""AKD on tiny models: one teacher pass per sample, gradients only into adapters, switchable terms."""

import pytest
import torch

from cdcca.adapter_state import state_hash
from cdcca.akd.config import LabelPhase, PrefixPhase, Replay, TrainedParams
from cdcca.akd.distill import AKD as _AKD
from cdcca.akd.distill import AKDConfig, Aligner, ReplayBuffer, wavelet_highband_l1
from cdcca.akd.source_set import random_source_set
from cdcca.model.mllm import adapter_state, is_adapter_key

QUESTIONS = ["what color is the shape?", "is there a circle in the image?", "what shape is present?",
             "is the shape red?", "what is the blue shape?"]


def AKD(teacher, student, prompter, cfg=None, source=None):
    """The distiller with a tiny random source set for rehearsal (the shipped default rehearses)."""
    cfg = cfg or AKDConfig()
    return _AKD(teacher, student, prompter, cfg, source=source or random_source_set(32, prompter.candidates))


def uplink(n=5):
    tokens = torch.randn(n, 49, 32)
    keep = torch.ones(n, 49, dtype=torch.bool)
    keep[:, 25:] = False
    return tokens, keep, QUESTIONS[:n], [f"s{i}" for i in range(n)]


def test_teacher_runs_once_per_sample_however_many_epochs(tiny_device, tiny_cloud, prompter):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(epochs=3, batch_size=2, min_teacher_confidence=0.0)))
    records = akd.teacher_pass(*uplink(5), batch_size=2)
    assert akd.teacher_forward_calls == 3 and akd.teacher_samples == 5
    akd.distill("d0", adapter_state(tiny_device), records)
    assert akd.teacher_forward_calls == 3 and akd.teacher_samples == 5     # epochs reuse the cache


def test_prefix_distillation_alone_runs_only_the_teachers_bridge_and_trains_the_same(tiny_device, tiny_cloud, prompter):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(epochs=0), prefix=PrefixPhase(epochs=2)))
    assert not akd.needs_answers
    batch = uplink(5)
    full = akd.teacher_pass(*batch)
    calls = akd.teacher_forward_calls
    bare = akd.teacher_pass(*batch, answers=False)
    assert akd.teacher_forward_calls == calls                                   # no LLM pass
    assert all(not r.answered and r.answered != f.answered for r, f in zip(bare, full))
    assert all(torch.equal(r.prefix, f.prefix) for r, f in zip(bare, full))
    base = adapter_state(tiny_device)
    with_answers, _ = akd.distill("a", base, full)
    without, stats = akd.distill("b", base, bare)
    assert state_hash(with_answers) == state_hash(without) and stats.samples == 0
    assert AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(epochs=1))).needs_answers


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
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(epochs=1, batch_size=4, min_teacher_confidence=0.0)))
    base = {k: v + 0.01 for k, v in adapter_state(tiny_device).items()}
    new, stats = akd.distill("d0", base, akd.teacher_pass(*uplink(4)))
    assert stats.steps == 1 and stats.samples == 4
    assert state_hash(new) != state_hash(base)
    assert set(new) == set(base)


@pytest.mark.parametrize("ablation,terms", [("ce", {"ce"}), ("ce+mse", {"ce", "mse"}),
                                            ("ce+mse+wave", {"ce", "mse", "wave"}), ("full", {"ce", "mse", "wave", "kl"})])
def test_each_loss_term_can_be_switched_off(tiny_device, tiny_cloud, prompter, ablation, terms):
    from cdcca.akd.config import LOSS_ABLATIONS

    cfg = AKDConfig(labels=LabelPhase(epochs=3, **LOSS_ABLATIONS[ablation]), prefix=PrefixPhase(epochs=0))
    akd = AKD(tiny_cloud, tiny_device, prompter, cfg)
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


# -- what decides whether the teacher's knowledge arrives --------------------------------------
def test_oracle_records_differ_from_teacher_records_in_the_labels_alone(tiny_device, tiny_cloud, prompter):
    from cdcca.akd.distill import with_true_labels

    akd = AKD(tiny_cloud, tiny_device, prompter)
    records = akd.teacher_pass(*uplink(4))
    truth = ["red", "yes", "circle", "no"]
    oracle = with_true_labels(records, truth, prompter.candidates)
    assert [r.pseudo_label for r in oracle] == truth and all(r.confidence == 1.0 for r in oracle)
    for r, o in zip(records, oracle):
        assert r.sample_id == o.sample_id and r.question == o.question
        assert o.tokens is r.tokens and o.keep is r.keep and o.hidden is r.hidden and o.logits is r.logits
        assert o.probs[prompter.candidates.index(o.pseudo_label)] == 1.0 and o.probs.sum() == 1.0
    with pytest.raises(ValueError):
        with_true_labels(records, truth[:2], prompter.candidates)


def test_entropy_weighting_scales_each_sample_by_cema_factor(tiny_device, tiny_cloud, prompter):
    import math

    from cdcca.akd.distill import answer_loss_per_sample

    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(w_mse=0, w_wave=0, w_kl=0, weighting="entropy")))
    records = akd.teacher_pass(*uplink(4))
    records[0].probs = torch.full((13,), 1 / 13)              # the teacher knows nothing about sample 0
    records[1].probs = torch.nn.functional.one_hot(torch.tensor(4), 13).float()   # and is sure about sample 1
    tiny_device.eval()                                         # no dropout: both forwards see the same network
    weighted = akd.loss_terms(records, Aligner(32, 32))["ce"]
    text = prompter.batch([r.question for r in records], [r.pseudo_label for r in records])
    fwd = tiny_device(torch.stack([r.tokens for r in records]).float(), torch.stack([r.keep for r in records]),
                      text.input_ids, text.attention_mask)
    per_sample = answer_loss_per_sample(tiny_device, fwd, text.labels)
    e0 = 0.4 * math.log(13)
    w = torch.tensor([math.exp(-(r.entropy - e0)) for r in records])
    assert torch.allclose(weighted, (w / w.mean() * per_sample).mean(), atol=1e-5)
    assert w[1] / w[0] == pytest.approx(13.0, rel=1e-4)       # exp(ln 13 − 0): the confident label counts 13×
    akd.cfg.labels.weighting = "none"
    assert torch.allclose(akd.loss_terms(records, Aligner(32, 32))["ce"], per_sample.mean(), atol=1e-5)


def test_per_sample_answer_loss_averages_to_the_batch_loss(tiny_device, prompter):
    from cdcca.akd.distill import answer_loss_per_sample
    from cdcca.model.mllm import answer_loss

    tiny_device.eval()
    text = prompter.batch(QUESTIONS[:3], ["red", "yes", "circle"])
    fwd = tiny_device(torch.randn(3, 49, 32), None, text.input_ids, text.attention_mask)
    per = answer_loss_per_sample(tiny_device, fwd, text.labels)
    n = (text.labels[:, 1:] != -100).sum(1)
    assert torch.allclose((per * n).sum() / n.sum(), answer_loss(tiny_device, fwd, text.labels), atol=1e-5)


def test_soft_targets_train_on_the_teacher_distribution(tiny_device, tiny_cloud, prompter):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(w_mse=0, w_wave=0, w_kl=0, targets="soft")))
    records = akd.teacher_pass(*uplink(2))
    tiny_device.eval()
    soft = akd.loss_terms(records, Aligner(32, 32))["ce"]
    for r in records:       # a one-hot distribution on the argmax is the hard label's first-token CE over candidates
        r.probs = torch.nn.functional.one_hot(r.probs.argmax(), 13).float()
    assert not torch.allclose(soft, akd.loss_terms(records, Aligner(32, 32))["ce"])


def tiny_source(n_images=6):
    from cdcca.akd.source_set import SourceSet

    questions = ["what shape is it?", "is it red?", "what color is it?"] * 2
    return SourceSet(torch.randn(n_images, 49, 32).half(), torch.arange(6) % n_images, questions,
                     ["circle", "no", "red", "triangle", "yes", "blue"])


def test_source_rehearsal_adds_a_true_label_term_and_needs_the_source_set(tiny_device, tiny_cloud, prompter):
    with pytest.raises(ValueError, match="source set"):
        _AKD(tiny_cloud, tiny_device, prompter, AKDConfig(replay=Replay(source=1.0)))
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(epochs=1, batch_size=2, min_teacher_confidence=0.0), replay=Replay(source=1.0)), source=tiny_source())
    _new, stats = akd.distill("d0", adapter_state(tiny_device), akd.teacher_pass(*uplink(4)))
    assert "source" in stats.losses and stats.losses["source"] > 0


def test_confidence_gate_drops_doubtful_pseudo_labels(tiny_device, tiny_cloud, prompter):
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(epochs=1, min_teacher_confidence=0.5)))
    records = akd.teacher_pass(*uplink(4))
    for r, c in zip(records, (0.9, 0.2, 0.6, 0.1)):
        r.confidence = c
    _, stats = akd.distill("d0", adapter_state(tiny_device), records)
    assert stats.samples == 2


def test_akd_config_is_split_by_concern_and_each_knob_has_one_name():
    """Which parameters / prefix distillation / label phase / replay: a knob lives in its part only."""
    cfg = AKDConfig(prefix=PrefixPhase(epochs=4), labels=LabelPhase(epochs=2, batch_size=8))
    assert (cfg.prefix.epochs, cfg.labels.epochs, cfg.labels.batch_size) == (4, 2, 8)
    for alias in ("prefix_epochs", "epochs", "source_replay", "min_teacher_confidence"):
        assert not hasattr(cfg, alias)
    with pytest.raises(TypeError, match="prefix_epochs"):
        AKDConfig(prefix_epochs=3)
    with pytest.raises(ValueError, match="both 0"):
        AKDConfig(labels=LabelPhase(epochs=0), prefix=PrefixPhase(epochs=0))


def test_each_parameter_group_names_the_tensors_its_phase_moves(tiny_device):
    from cdcca.akd.config import PREFIX_GROUPS, TRAIN_GROUPS

    names = list(adapter_state(tiny_device))
    bridge = [n for n in names if TRAIN_GROUPS["bridge"](n)]
    assert bridge and len(bridge) + sum(TRAIN_GROUPS["lora"](n) for n in names) == len(names)
    inputs = [n for n, _ in tiny_device.bridge.named_parameters() if PREFIX_GROUPS["input"](n)]
    assert inputs and all(n.startswith(("token_norm.", "token_proj.", "pos")) for n in inputs)
    with pytest.raises(ValueError, match=r"akd\.params\.train must be one of all, bridge, lora"):
        TrainedParams(train="everything")


def test_the_label_phase_loss_is_a_module_whose_parameters_are_the_aligners(tiny_device, tiny_cloud, prompter):
    from cdcca.akd.config import LabelPhase
    from cdcca.akd.losses import AKDLoss

    aligner = Aligner(32, 32)
    loss = AKDLoss(LabelPhase(), aligner, prompter.candidate_first_ids)
    assert [id(p) for p in loss.parameters()] == [id(p) for p in aligner.parameters()]
    akd = AKD(tiny_cloud, tiny_device, prompter, AKDConfig(labels=LabelPhase(epochs=1, min_teacher_confidence=0.0)))
    tiny_device.eval()
    assert set(akd.loss_terms(akd.teacher_pass(*uplink(2)), aligner)) == {"ce", "kl", "mse", "wave"}
