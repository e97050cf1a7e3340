"""What every test-time adaptation method needs: differentiable candidate logits, their entropy,
and the named parameter groups the papers adapt."""

from __future__ import annotations

import torch
from torch import nn

from cdcca.model.mllm import MLLM, is_adapter_key
from cdcca.model.prompt import Prompter


def candidate_logits(model: MLLM, prompter: Prompter, tokens: torch.Tensor, questions: list[str],
                     keep: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, n_candidates) over the answer candidates' first tokens, with autograd.

    The model stays in eval mode (no dropout: the prediction a user gets), gradients flow when enabled.
    """
    prompter.require_first_tokens("test-time adaptation (TENT, EATA, CoTTA)")
    model.eval()
    text = prompter.batch(questions)
    fwd = model(tokens, keep, text.input_ids, text.attention_mask)
    return model.logits(fwd.normed[:, -1])[:, prompter.candidate_first_ids].float()


def entropy(logits: torch.Tensor) -> torch.Tensor:
    """Per-row Shannon entropy (nats) of softmax(logits)."""
    logp = logits.log_softmax(-1)
    return -(logp.exp() * logp).sum(-1)


def norm_parameters(model: MLLM) -> dict[str, nn.Parameter]:
    """TENT's parameter group here: the LLM's RMSNorm weights and the bridge's LayerNorm affines.

    The device has no BatchNorm after the frozen encoder; normalisation layers are where TENT's
    channel-wise scale and shift live in this model (see docs/BASELINES.md).
    """
    out = {n: p for n, p in model.named_parameters()
           if not n.startswith("bridge.") and n.endswith("norm.weight") and is_adapter_key(n)}
    for mod_name, mod in model.bridge.named_modules():
        if isinstance(mod, nn.LayerNorm):
            for pname, p in mod.named_parameters():
                out[f"bridge.{mod_name}.{pname}"] = p
    return out


def adapter_parameters(model: MLLM) -> dict[str, nn.Parameter]:
    """Every parameter the device may change (LoRA, norms, bridge): CoTTA's "all weights"."""
    return {n: p for n, p in model.named_parameters() if is_adapter_key(n)}


def only_trainable(model: nn.Module, params: dict[str, nn.Parameter]) -> None:
    """Gradients for ``params`` only, so a method can never move anything its paper does not name."""
    chosen = {id(p) for p in params.values()}
    for p in model.parameters():
        p.requires_grad_(id(p) in chosen)
