"""The multimodal LLM: visual tokens → own bridge → a causal LM (full on the cloud, layer-pruned on the device).

Notation: B batch, P visual tokens (49 with EfficientNet-Lite0), Q = n_query bridge outputs, T text tokens,
d the LLM's width (576 for SmolLM2-135M).
The LLM sees ``[Q visual embeddings] + [left-padded text]``; padding sits between them, is masked
out, and position ids skip it, so every sample's text ends at the last position. Adapters — LoRA on
every linear projection of the decoder blocks (found from the architecture), the norm weights, and the whole bridge — are the only
weights that ever change after pretraining; :func:`is_adapter_key` says which those are.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn
from torch.nn import functional as F

from cdcca.adapter_state import AdapterState
from cdcca.model.bridge import Bridge, BridgeConfig
from cdcca.model.llm import lora_targets


@dataclass
class MLLMConfig:
    role: str = field(default="device", metadata={"help": "'device' | 'cloud'"})
    layer_ids: list[int] | None = field(default=None, metadata={"help": "decoder layers kept (None = all: the cloud)"})
    lora_r: int = field(default=16, metadata={"help": "LoRA rank of every adapted projection"})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA scale numerator (scale = lora_alpha / lora_r)"})
    bridge: BridgeConfig = field(default_factory=BridgeConfig, metadata={"help": (
        "the bridge from the encoder's visual tokens to the LLM's prefix")})
    lora_targets: list[str] | None = field(default=None, metadata={"help": (
        "module names that get LoRA (None: every linear projection of a decoder block)")})
    llm: str = field(default="smollm2-135m", metadata={"help": "which LLM (its tokenizer reads the role's text)"})

    def __post_init__(self):
        if self.role not in ("device", "cloud"):
            raise ValueError(f"role must be 'device' or 'cloud', got {self.role!r}")
        if self.lora_r < 1:
            raise ValueError(f"lora_r must be ≥ 1, got {self.lora_r}")


def is_adapter_key(name: str) -> bool:
    """True for the parameters a device may change: bridge, LoRA factors and LLM norms."""
    return name.startswith("bridge.") or "lora_" in name or name.endswith("norm.weight")


@dataclass
class Forward:
    hidden: torch.Tensor        # (B, Q+T, d) last decoder layer output, before the final norm
    normed: torch.Tensor        # (B, Q+T, d) after the final norm (what lm_head reads)
    n_visual: int
    visual: torch.Tensor        # (B, Q, d) the bridge's output: the visual prefix the LLM was fed


class MLLM(nn.Module):
    def __init__(self, cfg: MLLMConfig, lm: nn.Module):
        super().__init__()
        from peft import LoraConfig, get_peft_model

        self.cfg = cfg
        self.bridge = Bridge(cfg.bridge)
        targets = cfg.lora_targets or lora_targets(lm)
        lora = LoraConfig(r=cfg.lora_r, lora_alpha=cfg.lora_alpha, lora_dropout=0.0, target_modules=list(targets))
        self.lm = get_peft_model(lm, lora)
        for name, p in self.named_parameters():
            p.requires_grad_(is_adapter_key(name))

    # -- the pieces of the LLM that cdcca drives directly --------------------------------------
    @property
    def core(self) -> nn.Module:
        """The decoder stack (LlamaModel, Gemma3TextModel …) inside peft's wrapper."""
        return self.lm.get_base_model().get_decoder()

    @property
    def lm_head(self) -> nn.Module:
        return self.lm.get_base_model().get_output_embeddings()

    def embed_text(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.core.embed_tokens(input_ids)

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None, input_ids: torch.Tensor,
                attention_mask: torch.Tensor, past=None, use_cache: bool = False):
        """Run bridge + LLM; returns :class:`Forward` (and the KV cache when ``use_cache``)."""
        return self.from_prefix(self.bridge(tokens, keep), input_ids, attention_mask, past, use_cache)

    def from_prefix(self, vis: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor, past=None,
                    use_cache: bool = False):
        """Run the LLM on a given visual prefix ``vis`` (B, Q, d); the same returns as :meth:`forward`.

        Separate so that a prefix can be optimised directly through the LLM (``cdcca.recipes.prefix_targets``).
        """
        B, Q, _ = vis.shape
        text = self.embed_text(input_ids)
        embeds = torch.cat([vis.to(text.dtype), text], dim=1)                  # (B, Q+T, d); a bf16 LLM, fp32 bridge
        mask = torch.cat([attention_mask.new_ones(B, Q), attention_mask], dim=1)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        captured = {}

        def grab(_module, _inputs, output):
            captured["h"] = output[0] if isinstance(output, tuple) else output

        handle = self.core.layers[-1].register_forward_hook(grab)
        try:
            out = self.core(inputs_embeds=embeds, attention_mask=mask, position_ids=positions,
                            past_key_values=past, use_cache=use_cache)
        finally:
            handle.remove()
        fwd = Forward(hidden=captured["h"], normed=out.last_hidden_state, n_visual=Q, visual=vis)
        return (fwd, out.past_key_values, mask, positions) if use_cache else fwd

    def logits(self, normed: torch.Tensor) -> torch.Tensor:
        return self.lm_head(normed)


def answer_loss(model: MLLM, fwd: Forward, labels: torch.Tensor) -> torch.Tensor:
    """Next-token CE on labelled text positions (labels aligned with input_ids, -100 elsewhere)."""
    text = fwd.normed[:, fwd.n_visual:]                # (B, T, d)
    target = labels[:, 1:]                             # token t+1 is predicted at t
    sel = target != -100
    logits = model.logits(text[:, :-1][sel])           # (n_labelled, V)
    return F.cross_entropy(logits.float(), target[sel])


# -- adapter state ---------------------------------------------------------------------------
def adapter_state(model: nn.Module) -> AdapterState:
    """Exactly the adapter tensors (name → fp32 copy)."""
    return {n: p.detach().float().cpu().clone() for n, p in model.named_parameters() if is_adapter_key(n)}


def load_adapter_state(model: nn.Module, state: AdapterState, strict: bool = True) -> None:
    """Copy an adapter state into the model in place; refuses unknown or missing names when strict."""
    params = dict(model.named_parameters())
    expected = {n for n in params if is_adapter_key(n)}
    unknown = set(state) - expected
    missing = expected - set(state)
    if unknown or (strict and missing):
        raise ValueError(f"adapter state does not fit this model: {len(unknown)} unknown names "
                         f"(e.g. {sorted(unknown)[:2]}), {len(missing)} missing (e.g. {sorted(missing)[:2]})")
    with torch.no_grad():
        for name, value in state.items():
            p = params[name]
            if p.shape != value.shape:
                raise ValueError(f"adapter tensor {name} has shape {tuple(value.shape)}, model expects {tuple(p.shape)}")
            p.copy_(value.to(p.dtype))


def trainable_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for n, p in model.named_parameters() if is_adapter_key(n)]
