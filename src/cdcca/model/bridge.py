"""The bridge from visual tokens to the LLM: a query transformer followed by a projector.

Each model (device and cloud) owns its bridge; only the encoder below it is shared. Learned
queries cross-attend to the (possibly partly dropped) patch tokens; dropped positions are masked
out of the cross-attention, so a cloud receiving half the tokens attends only to what arrived.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass
class BridgeConfig:
    n_query: int = field(default=16, metadata={"help": "learned queries; each costs one LLM position"})
    d_bridge: int = field(default=256, metadata={"help": "width of the query transformer"})
    n_head: int = field(default=4, metadata={"help": "attention heads of the query transformer (must divide d_bridge)"})
    n_layer: int = field(default=2, metadata={"help": "query-transformer blocks"})
    token_dim: int = field(default=1280, metadata={"help": "the encoder's channels (EfficientNet-Lite0: 1280)"})
    n_tokens: int = field(default=49, metadata={"help": "the encoder's tokens an image (EfficientNet-Lite0: 7×7)"})
    d_lm: int = field(default=576, metadata={"help": "the LLM's hidden size (SmolLM2-135M: 576)"})
    dropout: float = field(default=0.1, metadata={"help": "dropout in the bridge's blocks while training"})

    def __post_init__(self):
        if self.d_bridge % self.n_head:
            raise ValueError(f"d_bridge={self.d_bridge} must divide by n_head={self.n_head}")

    @classmethod
    def of_state(cls, state: dict[str, torch.Tensor]) -> BridgeConfig:
        """The shapes of a saved bridge (its ``Bridge.state_dict()``): tokens, widths, queries and blocks, so a
        bridge of any pair loads without knowing which LLM it feeds. The head count leaves no trace in the shapes:
        every pair keeps the default."""
        n_layer = len({k.split(".")[1] for k in state if k.startswith("blocks.")})
        return cls(n_query=state["queries"].shape[1], d_bridge=state["queries"].shape[2], n_layer=n_layer,
                   token_dim=state["token_norm.weight"].shape[0], n_tokens=state["pos"].shape[1],
                   d_lm=state["to_lm.2.weight"].shape[0])


class QueryBlock(nn.Module):
    """Pre-norm block: self-attention over queries, cross-attention to tokens, MLP."""

    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        d = cfg.d_bridge
        self.ln_self = nn.LayerNorm(d)
        self.self_attn = nn.MultiheadAttention(d, cfg.n_head, dropout=cfg.dropout, batch_first=True)
        self.ln_cross = nn.LayerNorm(d)
        self.cross_attn = nn.MultiheadAttention(d, cfg.n_head, dropout=cfg.dropout, batch_first=True)
        self.ln_mlp = nn.LayerNorm(d)
        self.mlp = nn.Sequential(nn.Linear(d, 4 * d), nn.GELU(), nn.Linear(4 * d, d), nn.Dropout(cfg.dropout))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, kv_pad: torch.Tensor | None) -> torch.Tensor:
        h = self.ln_self(q)
        q = q + self.self_attn(h, h, h, need_weights=False)[0]
        q = q + self.cross_attn(self.ln_cross(q), kv, kv, key_padding_mask=kv_pad, need_weights=False)[0]
        return q + self.mlp(self.ln_mlp(q))


class Bridge(nn.Module):
    def __init__(self, cfg: BridgeConfig):
        super().__init__()
        self.cfg = cfg
        self.token_norm = nn.LayerNorm(cfg.token_dim)
        self.token_proj = nn.Linear(cfg.token_dim, cfg.d_bridge)
        self.pos = nn.Parameter(torch.zeros(1, cfg.n_tokens, cfg.d_bridge))
        self.queries = nn.Parameter(torch.randn(1, cfg.n_query, cfg.d_bridge) * 0.02)
        self.blocks = nn.ModuleList(QueryBlock(cfg) for _ in range(cfg.n_layer))
        self.ln_out = nn.LayerNorm(cfg.d_bridge)
        self.to_lm = nn.Sequential(nn.Linear(cfg.d_bridge, cfg.d_lm), nn.GELU(), nn.Linear(cfg.d_lm, cfg.d_lm))

    def forward(self, tokens: torch.Tensor, keep: torch.Tensor | None = None) -> torch.Tensor:
        """tokens (B, P, C) visual tokens; keep (B, P) bool, False = dropped. Returns (B, n_query, d_lm)."""
        B, P, C = tokens.shape
        if (P, C) != (self.cfg.n_tokens, self.cfg.token_dim):
            raise ValueError(f"the bridge reads {self.cfg.n_tokens} tokens × {self.cfg.token_dim} channels an image (its "
                             f"pair's encoder), got {P} × {C}: tokens from another encoder")
        kv = self.token_proj(self.token_norm(tokens.float())) + self.pos          # (B, P, d_bridge)
        pad = None if keep is None else ~keep.bool()
        if pad is not None and pad.all(dim=1).any():
            raise ValueError("every visual token of a sample is dropped; keep at least one")
        q = self.queries.expand(B, -1, -1)                                         # (B, n_query, d_bridge)
        for block in self.blocks:
            q = block(q, kv, pad)
        return self.to_lm(self.ln_out(q))                                          # (B, n_query, d_lm)
