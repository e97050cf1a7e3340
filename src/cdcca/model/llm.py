"""The language model half: loading SmolLM2 and compressing it for the device by layer pruning."""

from __future__ import annotations

from torch import nn


def device_layer_ids(n_layers: int = 30, keep_every: int = 3) -> list[int]:
    """Every ``keep_every``-th layer, always including the first and the last (30 → 10 layers)."""
    ids = list(range(0, n_layers, keep_every))
    if ids[-1] != n_layers - 1:
        ids[-1] = n_layers - 1
    return ids


def prune_layers(model: nn.Module, layer_ids: list[int]) -> nn.Module:
    """Keep only ``layer_ids`` decoder layers of a Llama-style causal LM, renumbering their cache index."""
    layers = model.model.layers
    if not layer_ids or max(layer_ids) >= len(layers) or sorted(set(layer_ids)) != list(layer_ids):
        raise ValueError(f"layer_ids must be sorted, unique and < {len(layers)}, got {layer_ids}")
    kept = nn.ModuleList([layers[i] for i in layer_ids])
    for new_idx, layer in enumerate(kept):
        layer.self_attn.layer_idx = new_idx
    model.model.layers = kept
    model.config.num_hidden_layers = len(kept)
    if getattr(model.config, "layer_types", None):
        model.config.layer_types = [model.config.layer_types[i] for i in layer_ids]
    return model
