"""Text side of a VQA request: "\nQuestion: …\nAnswer:" and the answer " word\n", left-padded."""

from __future__ import annotations

from dataclasses import dataclass

import torch

PROMPT = "\nQuestion: {question}\nAnswer:"
STOP = "\n"


@dataclass
class TextBatch:
    input_ids: torch.Tensor        # (B, T) left-padded
    attention_mask: torch.Tensor   # (B, T)
    labels: torch.Tensor | None    # (B, T) answer tokens, -100 elsewhere
    answer_start: torch.Tensor     # (B,) index of the position that predicts the first answer token


class Prompter:
    """Tokenizes questions (and answers) and knows the candidate answers' token ids. Multiple choice reads the
    candidates' first tokens in one pass while they differ (:attr:`sequence_scoring` otherwise)."""

    def __init__(self, tokenizer, candidates: list[str]):
        self.tokenizer = tokenizer
        self.candidates = list(candidates)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.stop_id = tokenizer(STOP, add_special_tokens=False).input_ids[0]
        self._answer_ids = {a: tokenizer(" " + a, add_special_tokens=False).input_ids for a in candidates}
        first = [ids[0] for ids in self._answer_ids.values()]
        owner: dict[int, str] = {}
        self.shared_first: list[tuple[str, str]] = []     # candidates one-pass scoring cannot tell apart
        for answer, token in zip(self._answer_ids, first):
            if token in owner:
                self.shared_first.append((owner[token], answer))
            owner.setdefault(token, answer)
        self.candidate_first_ids = torch.tensor(first)

    @property
    def sequence_scoring(self) -> bool:
        """Whether multiple choice must score each candidate's whole token sequence (two share a first token)."""
        return bool(self.shared_first)

    def require_first_tokens(self, what: str) -> None:
        """Refuse, in one line, a method that reads only the candidates' first tokens when two share one."""
        if self.shared_first:
            a, b = self.shared_first[0]
            raise ValueError(f"{what} scores candidates by their first token, and {a!r} and {b!r} share theirs; "
                             "use the default prefix distillation (multiple choice scores whole answers), or rename one")

    def answer_ids(self, answer: str) -> list[int]:
        ids = self._answer_ids.get(answer)
        return ids if ids is not None else self.tokenizer(" " + answer, add_special_tokens=False).input_ids

    def batch(self, questions: list[str], answers: list[str] | None = None) -> TextBatch:
        rows, label_rows, starts = [], [], []
        for i, q in enumerate(questions):
            prompt = self.tokenizer(PROMPT.format(question=q), add_special_tokens=False).input_ids
            ans = [] if answers is None else self.answer_ids(answers[i]) + [self.stop_id]
            rows.append(prompt + ans)
            label_rows.append([-100] * len(prompt) + ans)
            starts.append(len(prompt) - 1)
        T = max(len(r) for r in rows)
        ids = torch.full((len(rows), T), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), T), dtype=torch.long)
        labels = torch.full((len(rows), T), -100, dtype=torch.long)
        answer_start = torch.empty(len(rows), dtype=torch.long)
        for i, (r, lab, s) in enumerate(zip(rows, label_rows, starts)):
            off = T - len(r)
            ids[i, off:] = torch.tensor(r)
            mask[i, off:] = 1
            labels[i, off:] = torch.tensor(lab)
            answer_start[i] = off + s
        return TextBatch(ids, mask, labels if answers is not None else None, answer_start)


def normalize_answer(text: str) -> str:
    return text.strip().strip(".!?,;:").strip().lower()
