"""The MLLM on tiny random-initialised models: shapes, adapters, masking, answering."""

import pytest
import torch

from cdcca.adapter_state import state_hash
from cdcca.model.answer import answer_batch, mc_predict
from cdcca.model.llm import prune_layers
from cdcca.model.mllm import adapter_state, answer_loss, is_adapter_key, load_adapter_state
from cdcca.model.spec import parse_layers

QUESTIONS = ["what color is the shape?", "is there a circle in the image?", "what shape is present?"]
ANSWERS = ["red", "yes", "triangle"]


def test_device_keeps_every_third_layer_with_first_and_last():
    ids = parse_layers("every:3", 30)
    assert len(ids) == 10 and ids[0] == 0 and ids[-1] == 29


def test_prune_layers_renumbers_the_cache_index():
    from transformers import LlamaConfig, LlamaForCausalLM

    lm = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=6,
                                      num_attention_heads=2, num_key_value_heads=1))
    prune_layers(lm, [0, 3, 5])
    assert [layer.self_attn.layer_idx for layer in lm.model.layers] == [0, 1, 2]
    assert lm.config.num_hidden_layers == 3
    with pytest.raises(ValueError):
        prune_layers(lm, [5])


def test_gradients_reach_adapters_only(tiny_device, prompter):
    text = prompter.batch(QUESTIONS, ANSWERS)
    fwd = tiny_device(torch.randn(3, 49, 32), None, text.input_ids, text.attention_mask)
    answer_loss(tiny_device, fwd, text.labels).backward()
    for name, p in tiny_device.named_parameters():
        if is_adapter_key(name):
            assert p.requires_grad
        else:
            assert p.grad is None and not p.requires_grad, name
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for n, p in tiny_device.named_parameters() if "lora_B" in n)


def test_adapter_state_roundtrips_exactly(tiny_device):
    state = adapter_state(tiny_device)
    assert state and all(is_adapter_key(k) for k in state)
    bumped = {k: v + 1.0 for k, v in state.items()}
    load_adapter_state(tiny_device, bumped)
    assert state_hash(adapter_state(tiny_device)) == state_hash(bumped)


def test_load_adapter_state_rejects_a_foreign_state(tiny_device):
    state = adapter_state(tiny_device)
    state["bridge.not_a_param"] = torch.zeros(1)
    with pytest.raises(ValueError, match="unknown"):
        load_adapter_state(tiny_device, state)


def test_hidden_states_line_up_between_device_and_cloud(tiny_device, tiny_cloud, prompter):
    text = prompter.batch(QUESTIONS)
    toks = torch.randn(3, 49, 32)
    a = tiny_device(toks, None, text.input_ids, text.attention_mask)
    b = tiny_cloud(toks, None, text.input_ids, text.attention_mask)
    assert a.hidden.shape == b.hidden.shape


def test_dropped_tokens_are_masked_out_of_cross_attention(tiny_device, prompter):
    toks = torch.randn(1, 49, 32)
    keep = torch.zeros(1, 49, dtype=torch.bool)
    keep[0, :10] = True
    changed = toks.clone()
    changed[0, 10:] += 100.0                       # only dropped positions change
    p1 = mc_predict(tiny_device, prompter, toks, QUESTIONS[:1], keep)
    p2 = mc_predict(tiny_device, prompter, changed, QUESTIONS[:1], keep)
    torch.testing.assert_close(p1, p2)


def test_answers_carry_confidence_and_entropies(tiny_device, prompter):
    answers = answer_batch(tiny_device, prompter, torch.randn(3, 49, 32), QUESTIONS)
    for a in answers:
        assert 0.0 <= a.confidence <= 1.0
        assert a.entropies and all(e >= 0 for e in a.entropies)
        assert a.mc in prompter.candidates
        assert abs(sum(a.mc_probs) - 1) < 1e-4


def test_mc_and_first_generation_step_agree_on_the_candidates(tiny_device, prompter):
    toks = torch.randn(3, 49, 32)
    probs = mc_predict(tiny_device, prompter, toks, QUESTIONS)
    answers = answer_batch(tiny_device, prompter, toks, QUESTIONS)
    assert [prompter.candidates[int(i)] for i in probs.argmax(-1)] == [a.mc for a in answers]


def test_left_padding_does_not_change_a_sample(tiny_device, prompter):
    toks = torch.randn(2, 49, 32)
    alone = mc_predict(tiny_device, prompter, toks[:1], QUESTIONS[:1])
    padded = mc_predict(tiny_device, prompter, toks, [QUESTIONS[0], QUESTIONS[1] + " really, truly?"])[:1]
    torch.testing.assert_close(alone, padded, atol=1e-4, rtol=1e-4)
