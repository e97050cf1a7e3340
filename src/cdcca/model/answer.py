"""Answering: batched greedy generation (direct answer) and one-pass multiple-choice scoring.

Every answer carries its confidence — the product of per-step max probabilities, the released
code's rule — and its per-step token entropies and top-2 margin, which the uplink's sample
scorers build on. The first generation step doubles as the MC scorer: the candidates' first
tokens are distinct, so their logits at the answer position rank all 13 answers at once.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from cdcca.model.mllm import MLLM
from cdcca.model.prompt import Prompter, normalize_answer


@dataclass
class Answer:
    text: str                   # generated direct answer (normalized)
    mc: str                     # highest-likelihood candidate
    confidence: float           # Π_t max_v p_t(v) over generated answer tokens
    entropies: list[float]      # per-step entropy (nats)
    margin: float               # p(top1) − p(top2) at the first step
    mc_probs: list[float] = field(default_factory=list)   # softmax over the candidates' first tokens


@torch.no_grad()
def answer_batch(model: MLLM, prompter: Prompter, tokens: torch.Tensor, questions: list[str],
                 keep: torch.Tensor | None = None, max_new_tokens: int = 4, temperature: float = 1.0) -> list[Answer]:
    """Answer B questions about B token sets with greedy decoding and a KV cache."""
    model.eval()
    dev = next(model.parameters()).device
    text = prompter.batch(questions)
    tokens, keep = tokens.to(dev), None if keep is None else keep.to(dev)
    fwd, past, mask, positions = model(tokens, keep, text.input_ids.to(dev), text.attention_mask.to(dev), use_cache=True)
    logits = model.logits(fwd.normed[:, -1]).float().cpu()                     # (B, V)
    mc_probs = candidate_probs(model, prompter, tokens, questions, keep) if prompter.sequence_scoring \
        else logits[:, prompter.candidate_first_ids].softmax(-1)                # (B, n_cand)
    B = len(questions)
    generated = [[] for _ in range(B)]
    step_max, step_ent = [[] for _ in range(B)], [[] for _ in range(B)]
    probs = (logits / temperature).softmax(-1)
    top2 = probs.topk(2, dim=-1).values
    margin = (top2[:, 0] - top2[:, 1]).tolist()
    done = torch.zeros(B, dtype=torch.bool)
    last_pos = positions[:, -1]
    for step in range(max_new_tokens):
        if step:
            probs = (logits / temperature).softmax(-1)
        p_max, nxt = probs.max(-1)
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1)
        for i in range(B):
            if done[i]:
                continue
            if nxt[i].item() in (prompter.stop_id, prompter.tokenizer.eos_token_id) and generated[i]:
                done[i] = True
                continue
            generated[i].append(nxt[i].item())
            step_max[i].append(p_max[i].item())
            step_ent[i].append(ent[i].item())
        if done.all() or step == max_new_tokens - 1:
            break
        mask = torch.cat([mask, mask.new_ones(B, 1)], dim=1)
        last_pos = last_pos + 1
        out = model.core(inputs_embeds=model.embed_text(nxt[:, None].to(dev)), attention_mask=mask,
                         position_ids=last_pos[:, None], past_key_values=past, use_cache=True)
        past = out.past_key_values
        logits = model.logits(out.last_hidden_state[:, -1]).float().cpu()
    answers = []
    for i in range(B):
        conf = float(torch.tensor(step_max[i]).prod()) if step_max[i] else 0.0
        answers.append(Answer(
            text=normalize_answer(prompter.tokenizer.decode(generated[i])),
            mc=prompter.candidates[int(mc_probs[i].argmax())],
            confidence=conf, entropies=step_ent[i], margin=margin[i], mc_probs=mc_probs[i].tolist()))
    return answers


def answer_all(model: MLLM, prompter: Prompter, tokens: torch.Tensor, questions: list[str],
               batch_size: int = 64, temperature: float = 1.0) -> list[Answer]:
    """:func:`answer_batch` over any number of requests, ``batch_size`` at a time."""
    answers: list[Answer] = []
    for s in range(0, len(questions), batch_size):
        answers += answer_batch(model, prompter, tokens[s:s + batch_size], questions[s:s + batch_size],
                                temperature=temperature)
    return answers


@torch.no_grad()
def mc_predict(model: MLLM, prompter: Prompter, tokens: torch.Tensor, questions: list[str],
               keep: torch.Tensor | None = None) -> torch.Tensor:
    """Candidate probabilities (B, n_cand) from one forward pass (no generation); by whole answers
    (:func:`candidate_probs`) when two candidates share a first token."""
    model.eval()
    if prompter.sequence_scoring:
        return candidate_probs(model, prompter, tokens, questions, keep)
    dev = next(model.parameters()).device
    text = prompter.batch(questions)
    fwd = model(tokens.to(dev), None if keep is None else keep.to(dev), text.input_ids.to(dev), text.attention_mask.to(dev))
    logits = model.logits(fwd.normed[:, -1]).float().cpu()
    return logits[:, prompter.candidate_first_ids].softmax(-1)


@torch.no_grad()
def candidate_probs(model: MLLM, prompter: Prompter, tokens: torch.Tensor, questions: list[str],
                    keep: torch.Tensor | None = None, rows_per_pass: int = 256) -> torch.Tensor:
    """Candidate probabilities (B, n_cand) from each candidate's whole answer: the softmax over candidates of
    the mean log-likelihood of its tokens and the stop token (length-normalised, so "dark blue" does not lose
    to "dark" for being longer; the stop token tells "2" from "20").

    The prompt (visual prefix + question) runs once with a KV cache, which is then repeated per candidate and
    only the candidates' few tokens run on top of it; up to ``rows_per_pass`` (question, candidate) rows at a time."""
    model.eval()
    dev = next(model.parameters()).device
    seqs = [prompter.answer_ids(c) + [prompter.stop_id] for c in prompter.candidates]
    C, L = len(seqs), max(len(q) for q in seqs) - 1
    cont = torch.full((C, L), prompter.pad_id, dtype=torch.long)     # each candidate's tokens but its last …
    target = torch.full((C, L), -1, dtype=torch.long)               # … and the token each position predicts
    for c, q in enumerate(seqs):
        cont[c, :len(q) - 1], target[c, :len(q) - 1] = torch.tensor(q[:-1]), torch.tensor(q[1:])
    first = torch.tensor([q[0] for q in seqs])
    lengths = torch.tensor([len(q) for q in seqs], dtype=torch.float)
    out = []
    step = max(1, rows_per_pass // C)
    for s in range(0, len(questions), step):
        qs = questions[s:s + step]
        b = len(qs)
        text = prompter.batch(qs)
        fwd, past, mask, positions = model(tokens[s:s + b].to(dev), None if keep is None else keep[s:s + b].to(dev),
                                           text.input_ids.to(dev), text.attention_mask.to(dev), use_cache=True)
        score = model.logits(fwd.normed[:, -1]).float().log_softmax(-1).cpu()[:, first]       # (b, C) first tokens
        past.batch_repeat_interleave(C)                                # row b·C + c: question b, candidate c
        ids = cont.repeat(b, 1).to(dev)
        full_mask = torch.cat([mask.repeat_interleave(C, 0), mask.new_ones(b * C, L)], dim=1)
        pos = positions[:, -1].repeat_interleave(C)[:, None] + 1 + torch.arange(L, device=dev)
        hidden = model.core(inputs_embeds=model.embed_text(ids), attention_mask=full_mask, position_ids=pos,
                            past_key_values=past, use_cache=False).last_hidden_state                  # (b·C, L, d)
        tgt = target.repeat(b, 1).to(dev)
        sel = tgt >= 0
        picked = model.logits(hidden[sel]).float().log_softmax(-1).gather(-1, tgt[sel][:, None])[:, 0]
        rest = torch.zeros(b * C, device=picked.device).index_add_(0, sel.nonzero()[:, 0], picked)
        out.append(((score + rest.cpu().view(b, C)) / lengths).softmax(-1))
    return torch.cat(out)
