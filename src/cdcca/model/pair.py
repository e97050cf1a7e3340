"""The device/cloud model pair: how each role is built from the served spec, and where its adapters live.

The shipped pair: cloud = SmolLM2-135M (30 layers), device = the same LLM layer-pruned to 10 layers, both
on EfficientNet-Lite0 tokens. A pair's spec (:mod:`cdcca.model.spec`) may name any causal LM per role and
another encoder; each role then reads text with its own tokenizer (:func:`role_prompter`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file

from cdcca.assets import AssetError, load_llm, load_tokenizer, weights_root
from cdcca.model.bridge import BridgeConfig
from cdcca.model.encoder import encoder_shape
from cdcca.model.llm import prune_layers
from cdcca.model.mllm import MLLM, MLLMConfig, load_adapter_state
from cdcca.model.prompt import Prompter
from cdcca.model.spec import PairSpec, served_spec


def build_model(role: str, spec: PairSpec | None = None) -> MLLM:
    """A role's MLLM as ``spec`` (default: the served pair's) names it: its LLM loaded and pruned to the kept
    layers, a fresh bridge from the encoder's tokens to the LLM's width, fresh adapters."""
    spec = spec or served_spec()
    r = spec.role(role)
    lm = load_llm(r.llm, r.dtype)
    layer_ids = r.layer_ids(lm.config.num_hidden_layers)
    if layer_ids is not None:
        prune_layers(lm, layer_ids)
    shape = encoder_shape(spec.encoder)
    bridge = BridgeConfig(n_query=r.queries, token_dim=shape.token_dim, n_tokens=shape.n_tokens,
                          d_lm=lm.get_input_embeddings().embedding_dim)
    return MLLM(MLLMConfig(role=role, layer_ids=layer_ids, bridge=bridge, lora_targets=r.targets(), llm=r.llm), lm)


def role_tokenizer(role: str, spec: PairSpec | None = None):
    """The tokenizer of a role's LLM in the served pair (or ``spec``)."""
    return load_tokenizer((spec or served_spec()).role(role).llm)


def role_prompter(role: str, answers: list[str], spec: PairSpec | None = None) -> Prompter:
    """How a role of the served pair (or ``spec``) reads questions and scores ``answers``: its own tokenizer."""
    return Prompter(role_tokenizer(role, spec), answers)


def model_prompter(model: MLLM, answers: list[str]) -> Prompter:
    """A prompter in ``model``'s own tokenizer (a tiny random model reads SmolLM2's)."""
    return Prompter(load_tokenizer(model.cfg.llm), answers)


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


def load_adapters_file(role: str, path: Path, spec: PairSpec | None = None) -> MLLM:
    """Build a role and load the bridge + adapters of one ``ROLE.safetensors`` file (e.g. a stage's ``--init``)."""
    model = build_model(role, spec)
    try:
        state = {k: v.float() for k, v in load_file(str(path)).items()}
    except Exception as exc:
        raise AssetError(f"{path} is not a readable safetensors file; re-run: cdcca pretrain --role {role} --force") from exc
    try:
        load_adapter_state(model, state)
    except ValueError as exc:
        raise AssetError(f"{path} does not fit the {role} model its pair's spec builds ({model.cfg.llm}, "
                         f"{model.cfg.bridge.n_query} queries): {exc}; pretrain this role again") from None
    return model.eval()


def pretrain_record(role: str, root: Path | None = None) -> dict:
    """The recorded config, seed, metrics and SHA-256 that came with a role's weights."""
    path = weights_file(role, root).with_suffix(".json")
    return json.loads(path.read_text()) if path.is_file() else {}


def role_model(role: str, tiny: bool = False) -> MLLM:
    """The pretrained model of a role from the served pair, or a tiny random one (tests and transport checks)."""
    return tiny_model(role, seed=0 if role == "device" else 1) if tiny else load_pretrained(role)
