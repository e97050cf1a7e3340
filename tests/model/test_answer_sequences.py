"""Answers of several tokens: when two candidates share a first token, multiple choice scores each whole
answer (length-normalised, stop token included); methods that read first tokens only refuse in one line."""

import pytest
import torch

from cdcca.model.answer import answer_batch, candidate_probs, mc_predict
from cdcca.model.mllm import answer_loss
from cdcca.model.prompt import Prompter

SHARED = ["dark blue", "dark green", "2", "20", "no"]


def test_candidates_sharing_a_first_token_switch_to_whole_answer_scoring(tokenizer):
    prompter = Prompter(tokenizer, SHARED)
    assert prompter.sequence_scoring and ("dark blue", "dark green") in prompter.shared_first
    assert not Prompter(tokenizer, ["red", "blue", "yes"]).sequence_scoring
    with pytest.raises(ValueError, match=r"TENT.* 'dark blue' and 'dark green' share theirs"):
        prompter.require_first_tokens("test-time adaptation (TENT, EATA, CoTTA)")


def test_whole_answer_scores_are_the_softmax_of_each_answer_s_mean_log_likelihood(tiny_device, tokenizer):
    prompter = Prompter(tokenizer, SHARED)
    tokens, questions = torch.randn(3, 49, 32), ["what colour?", "how many?", "is it?"]
    probs = candidate_probs(tiny_device, prompter, tokens, questions, rows_per_pass=10)   # 2 questions a pass
    assert probs.shape == (3, 5) and torch.allclose(probs.sum(-1), torch.ones(3))
    by_hand = torch.empty(5)
    for c, answer in enumerate(SHARED):                  # one row each: answer_loss is its mean negative log-likelihood
        text = prompter.batch(questions[:1], [answer])
        fwd = tiny_device(tokens[:1], None, text.input_ids, text.attention_mask)
        by_hand[c] = -answer_loss(tiny_device, fwd, text.labels)
    assert torch.allclose(probs[0], by_hand.softmax(-1), atol=1e-4)
    assert torch.allclose(mc_predict(tiny_device, prompter, tokens, questions), probs)
    answers = answer_batch(tiny_device, prompter, tokens, questions)
    assert [a.mc for a in answers] == [SHARED[int(i)] for i in probs.argmax(-1)]


def test_distinct_first_tokens_keep_the_one_pass_scores(tiny_device, prompter):
    tokens, questions = torch.randn(2, 49, 32), ["what colour?", "what shape?"]
    one_pass = mc_predict(tiny_device, prompter, tokens, questions)
    text = prompter.batch(questions)
    fwd = tiny_device(tokens, None, text.input_ids, text.attention_mask)
    assert torch.allclose(one_pass, tiny_device.logits(fwd.normed[:, -1])[:, prompter.candidate_first_ids].softmax(-1))
