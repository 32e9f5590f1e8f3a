"""How many listing rounds the threshold filter's tiles need, on every tile and on half of them
(an emulation on the CPU: counts, not times).

The filter of kernels/knn_threshold.py lists a tile's entries ``s_ij <= t_i`` in rounds, one
entry per row and round: a tile takes as many rounds as the most entries of one of its rows
(the rows' rounds; the first stands before the loop). On half the tiles of a self-search
(``DAAL_KNN_SELECT=half``) a tile ``(I, J)``, ``J > I``, also lists the columns' entries
``s_ij <= t_j``, again by rows: as many more rounds as the most such entries of one row (the
columns' rounds). docs/kernels.md's estimates take about 2.3 of each at 60k rows (the expected
maximum of 128 Poisson counts of mean 128 * 128 / 60,000) and assume that the columns' counts
are no larger than the rows' (a "hub" row, listed by many others, would raise them).

This script computes the thresholds as the path does (the k-th nearest squared distance to a
1 / STRIDE sample, self pairs excluded, plus the GEMM form's margin: ``knn_threshold.thresholds``)
and the GEMM form in float32, then counts both kinds of rounds per tile. Its per-row counts are
the kernel's (bench/test_work_model.py, under the interpreter).

usage: python bench/knn_threshold_model.py [--n 60000] [--d 512] [--k 8] [--stride 16]
           [--block 128] [--seed 0]
"""
from __future__ import annotations

import argparse
import math
from typing import Dict

import torch

EPS = 1e-12  # kernels/_common.py's EPS: the clamp of a squared distance


def thresholds(x: torch.Tensor, k: int, stride: int) -> torch.Tensor:
    """``t_i`` (float32) of a self-search of ``x`` with self pairs excluded, as
    ``knn_threshold.sample_bounds`` and ``thresholds`` make them: the k-th smallest exact squared
    distance to the rows ``x[::stride]`` (a row of the sample skips itself), through the path's
    ``sqrt(max(e, eps))`` and back, then ``e (1 + 2^-10) + c_D (|x_i|^2 + max_j |x_j|^2)``,
    ``c_D = 2^-12 max(1, D / 2^10)``."""
    xd = x.double()
    sample = xd[::stride]
    e = torch.cdist(xd, sample).square()
    rows = torch.arange(0, x.shape[0], stride)
    e[rows, torch.arange(rows.numel())] = float("inf")
    e = e.kthvalue(k, dim=1).values.float()
    e = e.clamp_min(EPS).sqrt().square()
    xn = (x.float() ** 2).sum(1)
    return e * (1.0 + 2.0 ** -10) + (xn + xn.max()) * (2.0 ** -12 * max(1.0, x.shape[1] / 2.0 ** 10))


def listing_rounds(x: torch.Tensor, k: int = 8, stride: int = 16, block: int = 128,
                   chunk_blocks: int = 8) -> Dict[str, object]:
    """The filter's rounds on ``x`` (a self-search, self pairs excluded): ``counts`` (each row's
    listed entries: the kernel's ``count``), ``rows_all`` (the rows' rounds per tile of the filter
    on every tile, averaged), ``rows_half`` and ``columns_half`` (per tile ``J >= I`` of the
    half filter; the diagonal lists no columns' entries), ``columns_max`` and ``columns_over4``
    (the share of tiles ``J > I`` with more than 4 columns' rounds)."""
    x = x.float()
    n = x.shape[0]
    t = thresholds(x, k, stride)
    xn = (x * x).sum(1)
    nb = math.ceil(n / block)
    pad = nb * block - n
    rows_max = torch.zeros(nb, nb)
    cols_max = torch.zeros(nb, nb)
    counts = torch.zeros(n, dtype=torch.long)
    step = block * chunk_blocks
    for i0 in range(0, n, step):
        xs = x[i0:i0 + step]
        m = xs.shape[0]
        s = xn[i0:i0 + m, None] + xn[None, :] - 2.0 * (xs @ x.T)
        s[torch.arange(m), torch.arange(i0, i0 + m)] = float("inf")
        fwd = s <= t[i0:i0 + m, None]
        rev = s <= t[None, :]
        counts[i0:i0 + m] = fwd.sum(1)
        fwd = torch.nn.functional.pad(fwd.float(), (0, pad)).view(m, nb, block).sum(2)
        rev = torch.nn.functional.pad(rev.float(), (0, pad)).view(m, nb, block).sum(2)
        for b in range(math.ceil(m / block)):
            rows_max[i0 // block + b] = fwd[b * block:(b + 1) * block].max(0).values
            cols_max[i0 // block + b] = rev[b * block:(b + 1) * block].max(0).values
    upper = torch.triu(torch.ones(nb, nb, dtype=torch.bool), 1)
    half = torch.triu(torch.ones(nb, nb, dtype=torch.bool))
    return {"n": n, "k": k, "stride": stride, "block": block, "counts": counts,
            "entries_per_row": counts.float().mean().item(),
            "rows_all": rows_max.mean().item(), "rows_half": rows_max[half].mean().item(),
            "columns_half": cols_max[upper].sum().item() / max(1, int(half.sum())),
            "columns_max": cols_max[upper].max().item() if nb > 1 else 0.0,
            "columns_over4": (cols_max[upper] > 4).float().mean().item() if nb > 1 else 0.0}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--n", type=int, default=60000)
    ap.add_argument("--d", type=int, default=512)
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--stride", type=int, default=16)
    ap.add_argument("--block", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    g = torch.Generator().manual_seed(args.seed)
    x = torch.nn.functional.normalize(torch.randn(args.n, args.d, generator=g), dim=1).bfloat16().float()
    r = listing_rounds(x, args.k, args.stride, args.block)
    print(f"{r['n']} random unit rows, D = {args.d}, k = {r['k']}, a 1/{r['stride']} sample, "
          f"{r['block']} x {r['block']} tiles: {r['entries_per_row']:.1f} entries per row")
    print("| filter | tiles | rows' rounds per tile | columns' rounds per tile |")
    print("|---|---|---|---|")
    nb = math.ceil(r["n"] / r["block"])
    print(f"| every tile | {nb * nb:,} | {r['rows_all']:.2f} | - |")
    print(f"| half the tiles | {nb * (nb + 1) // 2:,} | {r['rows_half']:.2f} | {r['columns_half']:.2f} "
          f"(at most {r['columns_max']:.0f}; over 4 in {100 * r['columns_over4']:.2f}% of tiles) |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
