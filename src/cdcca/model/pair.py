"""The device/cloud model pair: how each role is built, and where its pretrained adapters live.

Cloud = full SmolLM2-135M (30 layers). Device = the same LLM layer-pruned to 10 layers (same
tokenizer and width, so hidden states and logits line up token for token with the cloud's).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cdcca.assets import AssetError, load_llm, weights_root
from cdcca.model.bridge import BridgeConfig
from cdcca.model.llm import device_layer_ids, prune_layers
from cdcca.model.mllm import MLLM, MLLMConfig, load_adapter_state


def model_config(role: str) -> MLLMConfig:
    return MLLMConfig(role=role, layer_ids=device_layer_ids() if role == "device" else None)


def build_model(role: str, cfg: MLLMConfig | None = None) -> MLLM:
    """A role's MLLM on the real SmolLM2 weights, adapters freshly initialised."""
    cfg = cfg or model_config(role)
    lm = load_llm()
    if cfg.layer_ids is not None:
        prune_layers(lm, cfg.layer_ids)
    return MLLM(cfg, lm)


def tiny_model(role: str = "device", seed: int = 0, token_dim: int = 32, vocab_size: int = 49152) -> MLLM:
    """A random-initialised MLLM of the same architecture, small enough for unit tests."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    n_layers = 3 if role == "cloud" else 1
    lm = LlamaForCausalLM(LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64,
                                      num_hidden_layers=n_layers, num_attention_heads=2, num_key_value_heads=1,
                                      tie_word_embeddings=True, pad_token_id=2, bos_token_id=1, eos_token_id=2))
    bridge = BridgeConfig(n_query=2, d_bridge=16, n_head=2, n_layer=1, token_dim=token_dim, d_lm=32, dropout=0.0)
    return MLLM(MLLMConfig(role=role, lora_r=4, lora_alpha=8, bridge=bridge), lm)


def weights_file(role: str, root: Path | None = None) -> Path:
    """A role's adapters in the pair in ``root`` (None: the pair this process serves)."""
    return (root or weights_root()) / f"{role}.safetensors"


def load_pretrained(role: str, root: Path | None = None) -> MLLM:
    """Build a role and load its pretrained bridge + adapters (fp16 on disk → fp32)."""
    path = weights_file(role, root)
    if not path.is_file():
        raise AssetError(f"pretrained {role} adapters not found at {path}; run: cdcca pretrain --role {role}")
    return load_adapters_file(role, path)


def load_adapters_file(role: str, path: Path) -> MLLM:
    """Build a role and load the bridge + adapters of one ``ROLE.safetensors`` file (e.g. a stage's ``--init``)."""
    model = build_model(role)
    try:
        state = {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as exc:
        raise AssetError(f"{path} is not a readable safetensors file; re-run: cdcca pretrain --role {role} --force") from exc
    load_adapter_state(model, state)
    return model.eval()


def pretrain_record(role: str, root: Path | None = None) -> dict:
    """The recorded config, seed, metrics and SHA-256 that came with a role's weights."""
    path = weights_file(role, root).with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else {}


def role_model(role: str, tiny: bool = False) -> MLLM:
    """The pretrained model of a role from the served pair, or a tiny random one (tests and transport checks)."""
    return tiny_model(role, seed=0 if role == "device" else 1) if tiny else load_pretrained(role)
