"""Which delta entries a round sends: magnitude top-k and energy prefixes, an exact byte-cost model
with the cheapest index mode per tensor, and a selector that re-fits cheaply for any budget."""

from __future__ import annotations

import numpy as np
import torch

from cdcca.downlink.config import _ESC, _SKIP, _WIDTHS

_SAMPLE = 65536  # entries sampled to guess a top-k threshold


def _topk_desc(a: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The k largest entries of the 1-D tensor ``a`` (values, flat indices), descending.

    Deterministic. For large ``a`` and small ``k`` a fixed-seed random sample picks a threshold
    that (almost always) keeps a little more than k candidates, so only those are sorted; if the
    sample misjudges, it falls back to ``torch.topk``.
    """
    n = a.numel()
    k = max(0, min(k, n))
    if k == 0:
        return a.new_empty(0), torch.empty(0, dtype=torch.int64)
    if k == n or n <= 4 * _SAMPLE or k > n // 8:
        if k == n:
            vals, idx = torch.sort(a, descending=True, stable=True)
            return vals, idx
        return torch.topk(a, k, sorted=True)
    gen = torch.Generator().manual_seed(0x5DC)
    sample = a[torch.randint(0, n, (_SAMPLE,), generator=gen)]
    want = min(_SAMPLE, int(k / n * _SAMPLE * 1.5) + 32)  # rank (descending) of the threshold
    thr = torch.kthvalue(sample, _SAMPLE - want + 1).values
    cand = torch.nonzero(a >= thr).squeeze(1)
    if cand.numel() < k:
        return torch.topk(a, k, sorted=True)
    cv = a[cand]
    if cand.numel() > 4 * k:
        vals, pos = torch.topk(cv, k, sorted=True)
    else:
        vals, pos = torch.sort(cv, descending=True, stable=True)
        vals, pos = vals[:k], pos[:k]
    return vals, cand[pos]


def _energy_topk(a: torch.Tensor, share: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Smallest descending prefix of ``a`` (an |Δ|) whose squared sum reaches ``share`` of the total."""
    n = a.numel()
    total = float(torch.sum(a.double() ** 2))
    need = share * total
    if n == 0 or need <= 0:
        return a.new_empty(0), torch.empty(0, dtype=torch.int64)
    # guess k from a sample, then grow until the prefix holds enough energy
    s = a[torch.randint(0, n, (min(n, _SAMPLE),), generator=torch.Generator().manual_seed(0xE7))]
    s2 = torch.sort(s.double() ** 2, descending=True).values
    cs = torch.cumsum(s2, 0)
    frac = (int(torch.searchsorted(cs, share * float(cs[-1]))) + 1) / s.numel() if float(cs[-1]) > 0 else 1.0
    k = min(n, int(frac * n * 1.25) + 256)
    while True:
        vals, idx = _topk_desc(a, k)
        ce = torch.cumsum(vals.double() ** 2, 0)
        if k >= n or (ce.numel() and float(ce[-1]) >= need):
            m = int(torch.searchsorted(ce, torch.tensor([need], dtype=torch.float64))) + 1
            m = min(m, vals.numel())
            return vals[:m], idx[:m]
        k = min(n, 4 * k)


class _Costs:
    """Exact-up-to-rounding byte cost of sending a candidate prefix, with the best mode per tensor."""

    def __init__(self, idx_desc: np.ndarray, starts: np.ndarray, numels: np.ndarray, cv: float):
        order = np.argsort(idx_desc, kind="stable")
        self.rank = order  # rank in magnitude order of the j-th candidate in position order
        pos = idx_desc[order]
        self.pos = pos  # candidate global positions, ascending
        ends = starts + numels
        self.tid = np.searchsorted(ends, pos, side="right")
        self.local = pos - starts[self.tid]
        self.numels = numels
        self.K = len(numels)
        self.cv = cv  # bytes per sent value: code + amortised fp16 scale
        self.bitmask = np.ceil(numels / 8.0) + 0.0
        self.dense = numels * cv

    def plan(self, k: int) -> tuple[float, np.ndarray, np.ndarray, np.ndarray]:
        """(total bytes, mode per tensor, best sparse width per tensor, selection mask)."""
        m = self.rank < k
        t, lp = self.tid[m], self.local[m]
        n = np.bincount(t, minlength=self.K).astype(np.float64)
        if t.size:
            g = np.empty_like(lp)
            g[0] = lp[0] + 1
            g[1:] = lp[1:] - lp[:-1]
            first = np.empty(t.size, dtype=bool)
            first[0] = True
            np.not_equal(t[1:], t[:-1], out=first[1:])
            g[first] = lp[first] + 1
        else:
            g = lp
        best = np.full(self.K, np.inf)
        width = np.zeros(self.K, dtype=np.int64)
        for w in _WIDTHS:
            if w == 4 or not t.size:  # tensors have < 2**31 entries: uint32 gaps never escape
                esc = 0.0
            else:
                esc = np.bincount(t, weights=(g // _ESC[w]).astype(np.float64), minlength=self.K)
            c = w * (n + esc)
            better = c < best
            best[better], width[better] = c[better], w
        costs = np.stack([np.zeros(self.K), best + n * self.cv, self.bitmask + n * self.cv, self.dense])
        mode = np.where(n > 0, np.argmin(costs[1:], axis=0) + 1, _SKIP)
        total = float(np.take_along_axis(costs, mode[None], 0).sum())
        return total, mode, width, m


class _Selector:
    """Chooses what to send from flat magnitudes ``a`` (one planner per scope unit).

    Candidates (the largest entries, enough for ``budget_cap`` bytes and/or the ``energy``
    share) are found once; :meth:`fit` then bisects the prefix length for any budget up to the
    cap, so the packet builder can re-fit cheaply after seeing how well the blobs compress.
    """

    def __init__(self, a: torch.Tensor, starts: np.ndarray, numels: np.ndarray,
                 budget_cap: float | None, energy: float | None, cv: float):
        self.K = len(numels)
        self.numels = numels
        self._seen: dict[int, float] = {}  # prefix length -> planned bytes, shared by all fits
        if a.numel() == 0:
            self.costs, self.nz = None, 0
            return
        if energy is not None:
            vals, idx = _energy_topk(a, energy)
            if budget_cap is not None:
                kb = int(max(0.0, budget_cap) // cv) + 1
                vals, idx = vals[:kb], idx[:kb]
        else:
            assert budget_cap is not None
            vals, idx = _topk_desc(a, int(max(0.0, budget_cap) // cv) + 1)
        self.nz = int(torch.count_nonzero(vals))  # zeros carry nothing; vals is descending
        self.costs = _Costs(idx[:self.nz].numpy().astype(np.int64, copy=False), starts, numels, cv)

    def fit(self, budget: float | None) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(mode per tensor, sparse index width per tensor, ascending global positions of the
        magnitude-selected entries) for the largest candidate prefix within ``budget`` bytes.
        Dense tensors send all their entries regardless of the positions listed."""
        if self.costs is None:
            z = np.zeros(self.K, np.int64)
            return z, z.copy(), np.zeros(0, np.int64)
        costs, seen = self.costs, self._seen
        if self.nz not in seen:
            seen[self.nz] = costs.plan(self.nz)[0]
        lo = self.nz
        if budget is not None and seen[self.nz] > budget:
            # Largest k with plan(k) <= budget, to within 1/256 of k: the cost is monotone and
            # nearly linear in k, so alternate secant (interpolation) steps with bisection,
            # starting from the tightest bracket that earlier fits already evaluated.
            lo = max((k for k, c in seen.items() if c <= budget), default=0)
            hi = min(k for k, c in seen.items() if c > budget)
            c_lo, c_hi = seen.get(lo, 0.0), seen[hi]
            step = 0
            while hi - lo > max(1, hi // 256):
                if step % 2 == 0:
                    mid = lo + int((budget - c_lo) * (hi - lo) / max(c_hi - c_lo, 1e-9))
                else:
                    mid = (lo + hi) // 2
                mid = min(max(mid, lo + 1), hi - 1)
                c = seen[mid] = costs.plan(mid)[0]
                if c <= budget:
                    lo, c_lo = mid, c
                else:
                    hi, c_hi = mid, c
                step += 1
        _, mode, width, m = costs.plan(lo)
        return mode, width, costs.pos[m]
