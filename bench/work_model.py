"""The work model of the line-margin kernels: flops and bytes of each kernel at a shape, from
the shape alone (torch-free, like ``cases.py``: ``report.py`` prints it beside the measured times
of a run). Estimates, not measurements; docs/kernels.md ("Fused line margin") explains the
numbers.

Per kernel: ``flops`` (tensor-core GEMM flops, 2 per multiply-add; the epilogues' elementwise work
is not counted), ``dram_bytes`` (compulsory traffic: every operand read and every result written
once per launch that needs it, perfect reuse inside a launch) and ``rmw_bytes`` (float32
read-modify-write of an accumulator kept in global memory inside an inner loop: none, which the
model keeps visible; the retired first design, v1, had ~19 GB of it at C = 100k).

The kernels (``kernels/line_margin.py``): prep (stats, cast); forward (X [P; Q]^T: 4 BCD); per
chunk of Cc classes: the fused backward kernel (X [P_c; Q_c]^T once: 4 BCD, writes a~, b~:
B x 2Cc), ``torch.mm`` for dX (AB [P_c; Q_c]: 4 B Cc D) and for G = AB^T X (4 B Cc D), and the
segment-gradient epilogue. 16 BCD.
"""
from __future__ import annotations

from typing import Dict, List

#: Mirrors ``kernels/line_margin.CHUNK_ELEMENTS`` (a test keeps them equal).
CHUNK_ELEMENTS = 1 << 24
#: Mirrors the half-precision tiles of ``kernels/line_margin.CONFIGS`` (a test keeps them equal).
V2_TILES = {"fwd2": (128, 64), "bwd2": (128, 32)}
ES = {"bf16": 2, "fp16": 2, "fp32": 4}


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def chunk_width(B: int, C: int, block_c: int = V2_TILES["bwd2"][1]) -> int:
    """Cc of the backward, ignoring the whole-wave adjustment (which only narrows it):
    the largest multiple of ``block_c`` with ``B Cc <= CHUNK_ELEMENTS``, at most C rounded up."""
    tiles = max(1, CHUNK_ELEMENTS // max(1, B * block_c))
    return min(tiles, _cdiv(C, block_c)) * block_c


def _copies_per_chunk(B: int, C: int, cast: bool, copy: str) -> bool:
    """The backward copies each chunk's segments (``DAAL_LM_COPY=chunks``, the default): where
    there is a copy and more than one chunk (with one, the forward's copy is saved)."""
    return cast and copy == "chunks" and chunk_width(B, C) < C


def kernels(B: int, C: int, D: int, dtype: str = "bf16", seg_dtype: str | None = None,
            xu: bool = True, copy: str = "chunks") -> List[Dict]:
    """The kernels of one forward + backward, each ``dict(name, pass_, flops, dram_bytes,
    rmw_bytes, launches)``; ``xu`` (``DAAL_LM_XU=dot``): the prep kernel always writes the copy
    ``[p~, u~]``; ``copy`` (``DAAL_LM_COPY``): "chunks", the backward writes it again chunk by
    chunk where it has several, "whole", the forward's is saved."""
    es = ES[dtype]
    ss = ES[seg_dtype or dtype]
    bcd = B * C * D
    out = []

    def k(name, pass_, flops, dram, rmw=0, launches=1):
        out.append(dict(name=name, pass_=pass_, flops=float(flops), dram_bytes=float(dram),
                        rmw_bytes=float(rmw), launches=launches))

    cast = xu or (seg_dtype is not None and seg_dtype != dtype)
    k("prep2", "fwd", 0, 2 * C * D * ss + (2 * C * D * es if cast else 0) + 16 * C)
    k("fwd2", "fwd", 4 * bcd, B * D * es + 2 * C * D * es + 16 * C + 8 * B * 64)
    cc = chunk_width(B, C)
    chunks = _cdiv(C, cc)
    ab = 2 * B * C * es  # a~, b~ of every chunk, written once and read twice
    k("bwd2", "bwd", 4 * bcd, chunks * B * D * es + 2 * C * D * es + 16 * C + ab
      + 4 * B * C // V2_TILES["bwd2"][1]
      + 16 * C * _cdiv(B, V2_TILES["bwd2"][0]), launches=chunks)
    k("mm dX (AB [P;Q])", "bwd", 4 * bcd, ab + 2 * C * D * es + chunks * 2 * 4 * B * D, launches=chunks)
    k("mm G (AB^T X)", "bwd", 4 * bcd, ab + chunks * B * D * es + 8 * C * D, launches=chunks)
    k("dseg2", "bwd", 0, 8 * C * D + 2 * C * D * ss * 2 + 16 * C * _cdiv(B, V2_TILES["bwd2"][0]),
      launches=chunks)
    if _copies_per_chunk(B, C, cast, copy):
        k("prep2 (chunk copies)", "bwd", 0, 2 * C * D * ss + 2 * C * D * es + 16 * C, launches=chunks)
    return out


def total_flops(B: int, C: int, D: int) -> float:
    """GEMM flops of one forward + backward: 16 BCD."""
    return sum(k["flops"] for k in kernels(B, C, D))


def extra_bytes(B: int, C: int, D: int, dtype: str = "bf16", seg_dtype: str | None = None,
                atomic: bool = False, xu: bool = True, copy: str = "chunks") -> int:
    """Peak extra memory of a forward + backward beyond the inputs (estimate): the backward's
    (the segment gradient, the saved statistics and cast segments, the chunk buffers (a~ b~, G,
    partials) and the own-class terms (B x 3 x D float32) with their class lists (B + C int32))
    or the forward's (its copy of the segments and the statistics), whichever is larger.
    ``atomic``: the design ``DAAL_LM_OWN_SEG=atomic`` keeps, whose gradient is float32
    (C x 2 x D) until a cast to the segments' dtype at the end (both alive then, for half
    segments). ``xu`` (``DAAL_LM_XU=dot``, the default): the cast segments ``[p~, u~]`` are
    always a copy (with ``difference``, only for segments of another dtype). ``copy``
    (``DAAL_LM_COPY``): "chunks" (the default), the backward holds one chunk's copy (Cc x 2 x D)
    where it has several; "whole", the forward's whole copy is saved for it."""
    es, ss = ES[dtype], ES[seg_dtype or dtype]
    cc = chunk_width(B, C)
    cast = xu or (seg_dtype is not None and seg_dtype != dtype)
    per_chunk = _copies_per_chunk(B, C, cast, copy)
    rows = cc if per_chunk else C
    grad = 2 * C * D * (4 + (ss if ss != 4 else 0)) if atomic else 2 * C * D * ss + 12 * B * D + 4 * (B + C)
    backward = (grad + (2 * rows * D * es if cast else 0) + 16 * C + 2 * B * cc * es
                + 8 * cc * D + 4 * B * D * 3 + 16 * cc * _cdiv(B, V2_TILES["bwd2"][0])
                + 4 * B * cc // V2_TILES["bwd2"][1] + (16 * cc if per_chunk else 0))
    forward = (2 * C * D * es if cast else 0) + 16 * C + 20 * B
    return int(max(backward, forward))


def summary(B: int, C: int, D: int, dtype: str = "bf16", xu: bool = True, copy: str = "chunks") -> Dict:
    ks = kernels(B, C, D, dtype, xu=xu, copy=copy)
    return dict(flops=sum(k["flops"] for k in ks),
                dram_bytes=sum(k["dram_bytes"] for k in ks), rmw_bytes=sum(k["rmw_bytes"] for k in ks),
                launches=sum(k["launches"] for k in ks))


def markdown(B: int, C: int, D: int, dtype: str = "bf16") -> List[str]:
    """One table: per kernel, GFLOP, compulsory GB and read-modify-write GB."""
    lines = [f"Work model at B={B:,}, C={C:,}, D={D} ({dtype}; estimates from the shape):", "",
             "| kernel | pass | GFLOP | DRAM GB (compulsory) | global RMW GB | launches |",
             "|---|---|---|---|---|---|"]
    for k in kernels(B, C, D, dtype):
        lines.append(f"| {k['name']} | {k['pass_']} | {k['flops'] / 1e9:.1f} | "
                     f"{k['dram_bytes'] / 1e9:.2f} | {k['rmw_bytes'] / 1e9:.2f} | {k['launches']} |")
    s = summary(B, C, D, dtype)
    lines.append(f"| **total** | fwd+bwd | {s['flops'] / 1e9:.1f} "
                 f"({s['flops'] / (B * C * D):.0f}·BCD) | {s['dram_bytes'] / 1e9:.2f} | "
                 f"{s['rmw_bytes'] / 1e9:.2f} | {s['launches']} |")
    return lines + [""]


if __name__ == "__main__":
    import sys

    dims = [int(v) for v in (sys.argv[1] if len(sys.argv) > 1 else "1024,100000,512").split(",")]
    print("\n".join(markdown(*dims)))
