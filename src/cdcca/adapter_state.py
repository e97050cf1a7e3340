"""Adapter state: the only weights that change on a device after deployment.

An adapter state is a plain ``dict[str, torch.Tensor]`` (name -> fp32 tensor). Everything that
compares, versions or ships adapters (the downlink diff, the cloud mirror, the device store)
identifies a state by :func:`state_hash`, so the hash is defined once, here.
"""

from __future__ import annotations

import hashlib

import torch

AdapterState = dict[str, torch.Tensor]


def state_hash(state: AdapterState) -> str:
    """SHA-256 over names, dtypes, shapes and raw bytes, in sorted name order (hex)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().contiguous().cpu()
        h.update(name.encode())
        h.update(str(t.dtype).encode())
        h.update(repr(tuple(t.shape)).encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def clone_state(state: AdapterState) -> AdapterState:
    """Deep copy (detached, contiguous, on CPU)."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in state.items()}
