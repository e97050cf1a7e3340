"""Index streams of the sparse and bitmask modes: escape-coded position gaps and packed bitmasks,
decoded strictly because the device must not trust a packet's indices."""

from __future__ import annotations

import numpy as np

from cdcca.downlink.config import _ESC
from cdcca.wire import PacketError

_NP_UINT = {1: np.dtype("<u1"), 2: np.dtype("<u2"), 4: np.dtype("<u4")}


def _encode_gaps(local: np.ndarray, w: int) -> bytes:
    """Sorted local positions -> escape-coded gap words of ``w`` bytes (see the package doc)."""
    g = np.empty_like(local)
    g[0] = local[0] + 1
    g[1:] = local[1:] - local[:-1]
    esc = _ESC[w]
    nesc = g // esc
    out = np.full(int(g.size + nesc.sum()), esc, dtype=np.int64)
    out[np.cumsum(nesc + 1) - 1] = g % esc
    return out.astype(_NP_UINT[w]).tobytes()


def _decode_gaps(buf: bytes, w: int, count: int, numel: int, key: str) -> np.ndarray:
    words = np.frombuffer(buf, dtype=_NP_UINT[w]).astype(np.int64)
    term = words != _ESC[w]
    if int(term.sum()) != count or not term[-1]:
        raise PacketError(f"update: index stream of {key!r} does not hold exactly {count} positions")
    pos = np.cumsum(words)[term] - 1
    if pos[0] < 0 or pos[-1] >= numel or (count > 1 and not np.all(pos[1:] > pos[:-1])):
        raise PacketError(f"update: index of {key!r} out of range or not strictly increasing "
                          f"(tensor has {numel} entries)")
    return pos


def _decode_bitmask(buf: bytes, count: int, numel: int, key: str) -> np.ndarray:
    bits = np.unpackbits(np.frombuffer(buf, dtype=np.uint8), bitorder="little")
    if bits[numel:].any():
        raise PacketError(f"update: bitmask of {key!r} has bits set beyond its {numel} entries")
    pos = np.flatnonzero(bits[:numel])
    if pos.size != count:
        raise PacketError(f"update: bitmask of {key!r} selects {pos.size} entries, table says {count}")
    return pos
