"""The language model half: compressing a causal LM for the device by layer pruning, and finding where LoRA goes.

Works on any decoder-only Hugging Face model whose decoder keeps its blocks in ``.layers`` (Llama, Qwen2,
Gemma3, Phi3, Mistral …): nothing here names an architecture.
"""

from __future__ import annotations

from torch import nn


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a causal LM (``model.get_decoder().layers``)."""
    layers = getattr(model.get_decoder(), "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"{type(model).__name__} keeps no decoder blocks in .layers; cdcca cannot prune or adapt it")
    return layers


def prune_layers(model: nn.Module, layer_ids: list[int]) -> nn.Module:
    """Keep only ``layer_ids`` decoder layers of a causal LM, renumbering their cache index."""
    layers = decoder_layers(model)
    if not layer_ids or max(layer_ids) >= len(layers) or sorted(set(layer_ids)) != list(layer_ids):
        raise ValueError(f"layer_ids must be sorted, unique and < {len(layers)}, got {layer_ids}")
    kept = nn.ModuleList([layers[i] for i in layer_ids])
    for new_idx, layer in enumerate(kept):
        attn = getattr(layer, "self_attn", None)
        if attn is not None and hasattr(attn, "layer_idx"):
            attn.layer_idx = new_idx
    model.get_decoder().layers = kept
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layer_ids]
    return model


def lora_targets(model: nn.Module) -> list[str]:
    """The names of every linear projection inside a decoder block (attention and MLP), found from the
    architecture: ``q_proj … down_proj`` on Llama/Qwen2/Gemma3, ``qkv_proj, o_proj, gate_up_proj, down_proj`` on Phi3."""
    names = sorted({name.rsplit(".", 1)[-1] for block in decoder_layers(model)
                    for name, module in block.named_modules() if isinstance(module, nn.Linear)})
    if not names:
        raise ValueError(f"{type(model).__name__}: no linear projection in its decoder blocks for LoRA")
    return names
