"""How many reductions the kNN forward's merge costs per tile, for its two merges (an emulation
on the CPU: counts, not times).

``_knn_merge_tile`` (kernels/knn.py) merges each BLOCK_M x BLOCK_N tile of squared distances
into each row's running top-KP in rounds; every round is one tile-wide row-min with its column
(shuffles inside a warp). The two merges differ in how many rounds run and in what they need
from the whole program (a block-wide reduction goes through shared memory with barriers):

- checked (``DAAL_KNN_MERGE=checked``): a row-min, then rounds while any row's minimum beats its
  worst, one block-wide reduction per round plus the last one that finds nothing:
  ``T + 1`` row-mins and ``T + 1`` block-wide reductions, ``T = max_i t_i``, ``t_i`` the tile's
  entries that enter row ``i``'s slots;
- counted (the default): the rows' candidates ``c_i`` (``s < worst``) counted once (a row sum and
  one block-wide max), then ``R = min(KP, max_i c_i)`` rounds: ``R`` row-mins (plus that row sum),
  one block-wide reduction.

This module replays the selection tile by tile on real distances (random unit vectors, the
query set its own reference set, self excluded, no labels: the benchmarks' retrieval case) and
counts both, per tile, averaged over query blocks. Its selection is checked against
``torch.topk`` by bench/test_work_model.py. What a round costs in time is a GPU question; the
compiled merge's instructions per round (SASS) are in docs/kernels.md.

A round is one pass over the whole tile, so the merge's work per distance is the rounds per
tile whatever the tile's size: that is how tile shapes compare here (``--block-m``,
``--block-n``).

usage: python bench/knn_merge_model.py [--n 20000,60000] [--k 8] [--blocks 4] [--block-m 128]
           [--block-n 128] [--classes 0,100,1000] [--spread 0.5] [--ordered]
"""
from __future__ import annotations

import argparse
from typing import Dict

import torch


def _next_pow2(n: int) -> int:
    return 1 << max(0, (n - 1).bit_length())


def merge_rounds(s: torch.Tensor, k: int, block_n: int = 128, row0: int = 0) -> Dict:
    """Replay the merge of one program over ``s`` (BLOCK_M x N squared distances of its rows,
    float32, ``inf`` for non-candidates) in tiles of ``block_n`` columns.

    Returns ``tiles`` and the totals ``checked_mins``, ``checked_blocks``, ``counted_mins``,
    ``counted_blocks`` (row-mins and block-wide reductions of each merge), with the final slots
    ``index`` (BLOCK_M x KP, ascending by ``(s, j)``, ``-1`` for empty)."""
    bm, n = s.shape
    kp = _next_pow2(k)
    top_s = torch.full((bm, kp), float("inf"))
    top_j = torch.full((bm, kp), -1, dtype=torch.int64)
    out = dict(tiles=0, checked_mins=0, checked_blocks=0, counted_mins=0, counted_blocks=0)
    for n0 in range(0, n, block_n):
        tile = s[:, n0:n0 + block_n]
        cols = torch.arange(n0, n0 + tile.shape[1]).expand(bm, -1)
        worst = top_s.max(dim=1, keepdim=True).values
        c = (tile < worst).sum(dim=1)  # candidates per row (inf never counts)
        # the new top-KP in (s, j) order: slots' columns are all smaller than the tile's
        both_s = torch.cat([top_s, tile], dim=1)
        both_j = torch.cat([top_j, cols], dim=1)
        order = torch.sort(both_s, dim=1, stable=True).indices[:, :kp]
        new_s, new_j = both_s.gather(1, order), both_j.gather(1, order)
        entered = ((order >= kp) & torch.isfinite(new_s)).sum(dim=1)  # t_i
        T = int(entered.max())
        out["tiles"] += 1
        out["checked_mins"] += T + 1
        out["checked_blocks"] += T + 1
        out["counted_mins"] += min(kp, int(c.max()))
        out["counted_blocks"] += 1
        top_s = new_s
        top_j = torch.where(torch.isfinite(new_s), new_j, torch.full_like(new_j, -1))
    out["index"] = top_j
    return out


def retrieval(n: int, k: int, *, D: int = 512, block_m: int = 128, block_n: int = 128,
              blocks: int = 4, seed: int = 0, classes: int = 0, spread: float = 0.5,
              ordered: bool = False) -> Dict:
    """Per-tile averages of :func:`merge_rounds` over ``blocks`` query blocks spread over an
    ``n``-row self kNN of random unit vectors (self excluded, one column split); ``classes`` > 0:
    rows drawn around that many random unit centres (``spread``: the noise's norm relative to
    the centre's), as a trained embedding's classes: in random order, or sorted by class with
    ``ordered``."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, D, generator=g)
    if classes:
        centres = torch.nn.functional.normalize(torch.randn(classes, D, generator=g), dim=1)
        labels = torch.randint(0, classes, (n,), generator=g)
        if ordered:  # as a folder of images per class is read
            labels = labels.sort().values
        x = centres[labels] + spread * torch.nn.functional.normalize(x, dim=1)
    x = torch.nn.functional.normalize(x, dim=1)
    sq = (x * x).sum(1)
    tot = dict(tiles=0, checked_mins=0, checked_blocks=0, counted_mins=0, counted_blocks=0)
    starts = torch.linspace(0, max(0, n - block_m), blocks).long().unique().tolist()
    for r0 in starts:
        q = x[r0:r0 + block_m]
        s = (sq[r0:r0 + block_m, None] + sq[None, :] - 2.0 * q @ x.T).clamp_min(1e-12)
        rows = torch.arange(r0, r0 + q.shape[0])
        s[torch.arange(q.shape[0]), rows] = float("inf")
        res = merge_rounds(s, k, block_n)
        for key in tot:
            tot[key] += res[key]
    per = {key: tot[key] / tot["tiles"] for key in tot if key != "tiles"}
    return dict(n=n, k=k, block_m=block_m, block_n=block_n, blocks=len(starts), **per)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", default="20000,60000")
    ap.add_argument("--k", type=int, default=8)
    ap.add_argument("--blocks", type=int, default=4)
    ap.add_argument("--block-m", type=int, default=128)
    ap.add_argument("--block-n", type=int, default=128)
    ap.add_argument("--classes", default="0", help="comma-separated; 0: no classes")
    ap.add_argument("--spread", type=float, default=0.5)
    ap.add_argument("--ordered", action="store_true", help="rows sorted by class")
    args = ap.parse_args(argv)
    print("| N | k | BLOCK_M x BLOCK_N | data | row-mins per tile: checked / counted "
          "| block-wide reductions per tile: checked / counted |")
    print("|---|---|---|---|---|---|")
    for n in (int(v) for v in args.n.split(",")):
        for c in (int(v) for v in args.classes.split(",")):
            r = retrieval(n, args.k, block_m=args.block_m, block_n=args.block_n, blocks=args.blocks, classes=c,
                          spread=args.spread, ordered=args.ordered)
            data = (f"{c} classes, spread {args.spread}" + (", sorted" if args.ordered else "")
                    if c else "uniform")
            print(f"| {n:,} | {args.k} | {args.block_m} x {args.block_n} | {data} "
                  f"| {r['checked_mins']:.2f} / {r['counted_mins']:.2f} "
                  f"| {r['checked_blocks']:.2f} / {r['counted_blocks']:.2f} |")


if __name__ == "__main__":
    main()
