"""Prefix targets: where the frozen cloud LLM wants each train image's visual prefix to be.

The cloud's bridge loses the shape's colour (docs/notebook.md §0.1) and end-to-end training through
the 30-layer LLM is too slow on a CPU to teach it back. This splits that training in two: first each
of a sample of train images gets its clean prefix optimised directly, through the frozen LLM and its
LoRA, on a few of the image's own questions (input gradients only, a few Adam steps); then the small
bridge is fitted to those targets from cached features (``cdcca.recipes.consistency``), its corrupted and partly
dropped views included — the same feature-consistency stage, with better targets. The LLM never
changes, and only train images and their true answers are used.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from cdcca.data.task import Task
from cdcca.model.mllm import MLLM, answer_loss
from cdcca.model.pair import load_adapters_file, model_prompter
from cdcca.model.placement import model_device, text_to
from cdcca.model.prompt import Prompter
from cdcca.recipes.checkpoint import config_digest, file_sha256


@dataclass
class TargetConfig:
    images: int = field(default=768, metadata={"help": "train images whose prefix is optimised (of 4,000)"})
    questions_per_image: int = field(default=4, metadata={"help": "its colour question, its shape question, the rest yes/no"})
    inner_steps: int = field(default=2, metadata={"help": "gradient steps on each prefix"})
    step_norm: float = field(default=120.0, metadata={"help": (
        "L2 length of one image's step (its 16 prefix vectors are ~260 each)")})
    images_per_batch: int = field(default=16, metadata={"help": "images whose prefixes are optimised together"})
    seed: int = field(default=0, metadata={"help": "seeds the choice of images and questions"})

    def __post_init__(self):
        if min(self.images, self.questions_per_image, self.inner_steps, self.images_per_batch) < 1:
            raise ValueError("TargetConfig.images, questions_per_image, inner_steps and images_per_batch must be ≥ 1")

    def digest(self) -> str:
        return config_digest(self)


def question_kind(answer: str) -> str:
    """yes/no, or a fact of the image (easy-VQA: its colour or shape; Fashion-MNIST: its item or kind)."""
    return "yes/no" if answer in ("yes", "no") else "fact"


def pick_questions(answers: list[str], rows: list[int], k: int, rng: np.random.Generator) -> list[int]:
    """Up to ``k`` of one image's question rows: one per distinct fact (its main facts first), the rest yes/no."""
    by_fact: dict[str, list[int]] = {}
    for r in rows:
        if question_kind(answers[r]) == "fact":
            by_fact.setdefault(answers[r], []).append(r)
    picked = [int(rng.choice(by_fact[a])) for a in sorted(by_fact)][:k]
    rest = [r for r in rows if question_kind(answers[r]) == "yes/no"]
    return picked + [int(r) for r in rng.choice(rest, min(len(rest), k - len(picked)), replace=False)]


def _mc_right(model: MLLM, prompter: Prompter, normed: torch.Tensor, labels: torch.Tensor, gold: torch.Tensor,
              n_visual: int) -> torch.Tensor:
    """Per row: whether the candidate scored highest at the answer position is the gold one."""
    first = (labels[:, 1:] != -100).float().argmax(1)             # position that predicts the answer's first token
    h = normed[:, n_visual:][torch.arange(len(first), device=first.device), first]
    prompter.require_first_tokens("the prefix-targets recipe")
    return model.logits(h)[:, prompter.candidate_first_ids].argmax(-1) == gold


def optimise_batch(model: MLLM, prompter: Prompter, prefix: torch.Tensor, questions: list[str], answers: list[str],
                   owner: torch.Tensor, cfg: TargetConfig) -> tuple[torch.Tensor, float, float]:
    """Normalised gradient steps on ``prefix`` (I, Q, d) so that the frozen LLM answers each question (row owner[j] its image).

    Returns the optimised prefixes and the share of questions answered right before and after.
    """
    dev = prefix.device                         # the model's (optimise_prefixes puts the start there)
    text = text_to(prompter.batch(questions, answers), dev)
    gold = torch.tensor([prompter.candidates.index(a) for a in answers], device=dev)
    owner = owner.to(dev)
    p = prefix.detach().clone().requires_grad_(True)
    right = []
    for step in range(cfg.inner_steps + 1):
        fwd = model.from_prefix(p[owner], text.input_ids, text.attention_mask)
        with torch.no_grad():
            right.append(float(_mc_right(model, prompter, fwd.normed, text.labels, gold, fwd.n_visual).float().mean()))
        if step == cfg.inner_steps:
            break
        (grad,) = torch.autograd.grad(answer_loss(model, fwd, text.labels), p)
        with torch.no_grad():   # normalised steepest descent: the change goes where the LLM is sensitive
            p -= cfg.step_norm * grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12)[:, None, None]
    return p.detach().cpu(), right[0], right[-1]


def optimise_prefixes(model: MLLM, prompter: Prompter, data, tokens: torch.Tensor, cfg: TargetConfig,
                      progress=None) -> tuple[np.ndarray, torch.Tensor, dict]:
    """Optimised clean prefixes of ``cfg.images`` random train images.

    ``data`` is the train split, ``tokens`` its cached (N, P, C) features. Returns (image ids, targets
    (I, Q, d), stats with the share of the picked questions answered right before and after).
    """
    model.eval()
    was_trainable = [p.requires_grad for p in model.parameters()]
    for p in model.parameters():
        p.requires_grad_(False)
    rng = np.random.default_rng(cfg.seed)
    rows: dict[int, list[int]] = {}
    for r, image in enumerate(data.image_ids):
        rows.setdefault(int(image), []).append(r)
    images = np.sort(rng.choice(sorted(rows), min(cfg.images, len(rows)), replace=False))
    targets, before, after = [], [], []
    try:
        for s in range(0, len(images), cfg.images_per_batch):
            batch = images[s:s + cfg.images_per_batch]
            picked = [pick_questions(data.answers, rows[int(i)], cfg.questions_per_image, rng) for i in batch]
            owner = torch.tensor([k for k, qs in enumerate(picked) for _ in qs])
            flat = [q for qs in picked for q in qs]
            with torch.no_grad():
                start = model.bridge(tokens[batch].float().to(model_device(model)))
            p, b, a = optimise_batch(model, prompter, start, [data.questions[q] for q in flat],
                                     [data.answers[q] for q in flat], owner, cfg)
            targets.append(p)
            before.append((b, len(flat)))
            after.append((a, len(flat)))
            if progress is not None:
                progress(s + len(batch), a)
    finally:
        for p, g in zip(model.parameters(), was_trainable):
            p.requires_grad_(g)
    n = sum(k for _, k in before)
    stats = {"questions": n, "right_before": sum(v * k for v, k in before) / n, "right_after": sum(v * k for v, k in after) / n}
    return images, torch.cat(targets), stats


def image_classes(answers: list[str], image_ids) -> dict[int, tuple[str, ...]]:
    """Image id → its class: the set of its answers other than yes/no (easy-VQA: its colour and shape;
    Fashion-MNIST: its item and kind). Needs no knowledge of the task: images that answer alike are alike."""
    facts: dict[int, set[str]] = {}
    for answer, image in zip(answers, image_ids):
        if question_kind(answer) != "yes/no":
            facts.setdefault(int(image), set()).add(answer)
    return {i: tuple(sorted(f)) for i, f in facts.items()}


def class_mean_targets(images: np.ndarray, targets: torch.Tensor, start: torch.Tensor,
                       classes: dict[int, tuple[str, ...]]) -> tuple[np.ndarray, torch.Tensor]:
    """Targets for every image with a class: its own start prefix plus the mean change of its class.

    A single image's optimised change is mostly its own (it barely generalises: a bridge fitted to
    them explains ~5 % of the change); the mean over the images of one (colour, shape) class keeps
    the part the LLM needs for that class — a smooth function of what the image shows, which the
    bridge can learn (a class is the set of an image's non-yes/no answers). ``images``/``targets`` are the optimised ones; ``start`` (N, Q, d) the start
    prefixes of all N train images. Returns (image ids, targets) of all images with a class.
    """
    change: dict[tuple[str, ...], list[torch.Tensor]] = {}
    for image, target in zip(images, targets):
        if int(image) in classes:
            change.setdefault(classes[int(image)], []).append(target - start[int(image)])
    mean = {k: torch.stack(v).mean(0) for k, v in change.items()}
    ids = np.array(sorted(i for i, k in classes.items() if k in mean and i < len(start)))
    return ids, torch.stack([start[i] + mean[classes[int(i)]] for i in ids])


def targets_key(init: Path, cfg: TargetConfig) -> str:
    """What the targets depend on: the config and the cloud adapters they were optimised through."""
    return f"{cfg.digest()}-{file_sha256(init)[:16]}"


def save_targets(path: Path, images: np.ndarray, targets: torch.Tensor, key: str, stats: dict) -> None:
    save_file({"images": torch.as_tensor(images, dtype=torch.int64), "targets": targets.contiguous()}, str(path),
              metadata={"key": key, "stats": json.dumps(stats)})


def load_targets(path: Path, key: str) -> tuple[np.ndarray, torch.Tensor, dict] | None:
    """Targets saved under the same :func:`targets_key`, or None (absent, another key, or unreadable)."""
    from safetensors import safe_open

    if not path.is_file():
        return None
    try:
        with safe_open(str(path), "pt") as f:
            meta = f.metadata() or {}
        if meta.get("key") != key:
            return None
        saved = load_file(str(path))
        return saved["images"].numpy(), saved["targets"], json.loads(meta.get("stats", "{}"))
    except Exception:
        return None


def targets_for(init: Path, cfg: TargetConfig, out_dir: Path, task: Task, tokens: torch.Tensor,
                progress=None, device: str = "cpu") -> tuple[np.ndarray, torch.Tensor, dict]:
    """The bridge targets of the cloud adapters in ``init`` for every train image with a class.

    The optimised prefixes (the costly part) are read from ``out_dir`` when a run with the same key
    left them there, else optimised and saved there; :func:`class_mean_targets` turns them into
    targets for all images. Returns (image ids, targets, stats)."""

    key, path = targets_key(init, cfg), out_dir / "cloud.targets.safetensors"
    model = load_adapters_file("cloud", init).to(device)     # the prefixes' optimisation runs there
    data = task.split("train")
    saved = load_targets(path, key)
    if saved is None:
        saved = optimise_prefixes(model, model_prompter(model, task.answers), data, tokens, cfg, progress)
        out_dir.mkdir(parents=True, exist_ok=True)
        save_targets(path, *saved[:2], key, saved[2])
    images, targets, stats = saved
    with torch.no_grad():
        start = torch.cat([model.bridge(tokens[s:s + 256].float().to(device)).cpu() for s in range(0, len(tokens), 256)])
    ids, class_targets = class_mean_targets(images, targets, start, image_classes(data.answers, data.image_ids))
    return ids, class_targets, {**stats, "optimised_images": len(images), "target_images": len(ids)}
