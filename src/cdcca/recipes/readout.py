"""Read-out tuning: the cloud's top decoder layers learn to read the prefix its bridge now gives.

After the prefix targets (:mod:`cdcca.recipes.prefix_targets`) the shape's colour is back in the cloud bridge's
output, but the LLM still misreads some prefixes: even the ideal class change added to a train image's
prefix leaves ~4 % of its questions wrong (docs/notebook.md §0.1). Training through the whole 30-layer
LLM is too slow on a CPU; this trains only the LoRA and norms of its top layers, from the hidden states
of the frozen lower layers computed once — ~1.3 s per step of 32 on 2 cores against ~4.5 s end to end.
The samples are train questions with their true answers, on clean and on corrupted views of their
images (the nine training corruptions, the consistency stage's cached copies), so the read-out is
learnt for shifted inputs too. The bridge and the lower layers do not change.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from cdcca.atomic import write_safetensors
from cdcca.data.task import Task
from cdcca.model.mllm import MLLM, adapter_state, is_adapter_key
from cdcca.model.pair import load_adapters_file, model_prompter
from cdcca.model.placement import model_device, text_to
from cdcca.model.prompt import Prompter, TextBatch
from cdcca.recipes.checkpoint import config_digest, file_sha256
from cdcca.recipes.pretrain import one_cycle_lr


@dataclass
class ReadoutConfig:
    split_layer: int = field(default=24, metadata={"help": (
        "layers below run once, frozen; the LoRA and norms above are trained")})
    samples: int = field(default=6144, metadata={"help": "train questions whose lower-layer hidden states are cached"})
    epochs: int = field(default=2, metadata={"help": "passes over the cached samples"})
    lr: float = field(default=1e-3, metadata={"help": "peak of the one-cycle schedule"})
    batch_size: int = field(default=32, metadata={"help": "samples per step"})
    aug_share: float = field(default=0.5, metadata={"help": "share of samples seen through a corrupted copy of their image"})
    grad_clip: float = field(default=1.0, metadata={"help": "gradient norm clip"})
    seed: int = field(default=0, metadata={"help": "seeds the sample choice, the corrupted views and the batches"})

    def __post_init__(self):
        if min(self.split_layer, self.samples, self.epochs, self.batch_size) < 1 or self.lr <= 0:
            raise ValueError("ReadoutConfig.split_layer, samples, epochs, batch_size and lr must be positive")
        if not 0.0 <= self.aug_share <= 1.0:
            raise ValueError(f"ReadoutConfig.aug_share must be in [0, 1]; got {self.aug_share}")

    @property
    def batches(self) -> int:
        """Cached batches; each epoch takes one optimizer step on every one of them."""
        return -(-self.samples // self.batch_size)

    def digest(self) -> str:
        return config_digest(self, recipe="readout")


class SplitLLM:
    """A model's decoder cut after layer ``split``: the lower part runs once without gradients, the
    upper part is trained on what it gave."""

    def __init__(self, model: MLLM, split: int):
        self.model, self.split = model, split
        self.layers = model.core.layers
        if not 0 < split < len(self.layers):
            raise ValueError(f"split layer {split} must lie inside the decoder's {len(self.layers)} layers")
        self.lower, self.upper = nn.ModuleList(self.layers[:split]), nn.ModuleList(self.layers[split:])

    def _with_layers(self, layers: nn.ModuleList, run):
        self.model.core.layers = layers
        try:
            return run()
        finally:
            self.model.core.layers = self.layers

    @torch.no_grad()
    def lower_pass(self, tokens: torch.Tensor, text: TextBatch) -> tuple[torch.Tensor, int]:
        """Hidden states (B, Q+T, d) after the lower layers and the prefix length Q."""
        fwd = self._with_layers(self.lower, lambda: self.model(tokens, None, text.input_ids, text.attention_mask))
        return fwd.hidden, fwd.n_visual

    def upper_pass(self, hidden: torch.Tensor, n_visual: int, text: TextBatch) -> torch.Tensor:
        """The final normed states (B, Q+T, d) from the lower layers' hidden states."""
        mask = torch.cat([text.attention_mask.new_ones(len(hidden), n_visual), text.attention_mask], 1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return self._with_layers(self.upper, lambda: self.model.core(
            inputs_embeds=hidden, attention_mask=mask, position_ids=positions).last_hidden_state)

    def trainable(self) -> dict[str, nn.Parameter]:
        """The adapter tensors of the upper layers (LoRA and norms); the bridge and lower layers stay."""
        def upper(name: str) -> bool:
            return ".layers." not in name or int(name.split(".layers.")[1].split(".")[0]) >= self.split
        return {n: p for n, p in self.model.named_parameters()
                if is_adapter_key(n) and not n.startswith("bridge.") and upper(n)}


def readout_loss(split: SplitLLM, hidden: torch.Tensor, n_visual: int, text: TextBatch) -> torch.Tensor:
    """Next-token CE on the answer tokens, through the upper layers only."""
    normed = split.upper_pass(hidden, n_visual, text)[:, n_visual:]
    target = text.labels[:, 1:]
    sel = target != -100
    return F.cross_entropy(split.model.logits(normed[:, :-1][sel]).float(), target[sel])


def cache_lower(split: SplitLLM, data, prompter: Prompter, clean: torch.Tensor, variants: list[torch.Tensor],
                cfg: ReadoutConfig) -> list[tuple[torch.Tensor, int, TextBatch]]:
    """Lower-layer hidden states of ``cfg.samples`` random train questions, in batches; a share
    ``cfg.aug_share`` of them through a random corrupted copy of their image."""
    rng = np.random.default_rng(cfg.seed)
    batches, dev = [], model_device(split.model)       # the cache lives where the model computes
    for _ in range(cfg.batches):
        rows = rng.integers(0, len(data.questions), cfg.batch_size)
        images = data.image_ids[rows]
        corrupted = (rng.random(cfg.batch_size) < cfg.aug_share) & (len(variants) > 0)
        tokens = torch.stack([variants[rng.integers(len(variants))][i] if c else clean[i]
                              for i, c in zip(images, corrupted)]).float().to(dev)
        text = text_to(prompter.batch([data.questions[r] for r in rows], [data.answers[r] for r in rows]), dev)
        batches.append((*split.lower_pass(tokens, text), text))
    return batches


def tune_readout(model: MLLM, cfg: ReadoutConfig, data, prompter: Prompter, clean: torch.Tensor,
                 variants: list[torch.Tensor], progress=None) -> dict:
    """Train the upper layers' adapters of ``model`` in place; the loss curve and the times."""

    split = SplitLLM(model, cfg.split_layer)
    model.eval()                                   # no dropout: the cached lower states are deterministic
    frozen = {n: p.requires_grad for n, p in model.named_parameters()}
    params = list(split.trainable().values())
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params:
        p.requires_grad_(True)
    t0 = time.perf_counter()
    try:
        batches = cache_lower(split, data, prompter, clean, variants, cfg)
        cache_s, t1 = time.perf_counter() - t0, time.perf_counter()
        opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=0.0, betas=(0.9, 0.95))
        rng, losses = np.random.default_rng(cfg.seed + 1), []
        order = [j for _ in range(cfg.epochs) for j in rng.permutation(len(batches))]
        for step, j in enumerate(order):
            for g in opt.param_groups:
                g["lr"] = one_cycle_lr(cfg.lr, step, len(order), warmup=0.1)
            loss = readout_loss(split, *batches[j])
            opt.zero_grad()
            loss.backward()
            torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
            opt.step()
            losses.append(float(loss.detach()))
            if progress is not None:
                progress(step + 1, losses[-1])
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(frozen[n])
    train_s = time.perf_counter() - t1
    return {"first_loss": float(np.mean(losses[:20])), "final_loss": float(np.mean(losses[-50:])),
            "steps": len(order), "trained_params": sum(p.numel() for p in params),
            "cache_s": round(cache_s, 1), "train_s": round(train_s, 1), "s_per_step": round(train_s / len(order), 3)}


def train_readout(init: Path, cfg: ReadoutConfig, out_dir: Path, task: Task, clean: torch.Tensor,
                  variants: list[torch.Tensor], progress=None, device: str = "cpu") -> dict:
    """Read-out tuning of the cloud adapters in ``init``; writes ``out_dir/cloud.safetensors`` and
    returns its record (config, hashes, loss, times)."""

    model = load_adapters_file("cloud", init).to(device)
    stats = tune_readout(model, cfg, task.split("train"), model_prompter(model, task.answers), clean, variants,
                         progress)
    path = out_dir / "cloud.safetensors"
    write_safetensors(path, {k: v.half() for k, v in adapter_state(model).items()},
                      metadata={"role": "cloud", "digest": cfg.digest()})
    return {"recipe": "readout", "config": asdict(cfg), "digest": cfg.digest(),
            "init_sha256": file_sha256(init), "sha256": file_sha256(path), **stats, "torch": torch.__version__}
