"""What the three operators share: constants, the dtype rule, input preparation, the
``@triton.jit`` helpers, and the one launch-configuration model.

The configuration model (docs/kernels.md, "Launch configurations")
------------------------------------------------------------------
* :class:`KernelSpec` describes one ``@triton.jit`` kernel: the Triton type of each runtime
  argument, whether its hot loop is a tensor-core dot, and how each stride argument looks on the
  hot path (a contiguous launch with ``D % 16 == 0``): ``unit`` (a last-dimension stride, equal
  to 1), ``rows`` (the row stride of a D-wide tensor, divisible by 16) or ``other`` (depends on
  other sizes). Each op module declares the spec of each kernel next to the kernel.
* :class:`KernelConfig` is one launch configuration: tile sizes (``BLOCK_*``, ``GROUP_M``),
  ``num_warps``, ``num_stages`` and the range of the D-chunk ``BLOCK_D``.
* Each op module holds ``CONFIGS[family][entry]``: the configurations its launchers pick from,
  by dtype family (:func:`family`) and kernel entry; and ``launches()``: every
  (kernel, dtype, configuration, BLOCK_D) the launchers can pick on a GPU, as :class:`Launch`
  objects, which is what the compile tests build. :func:`every_launch` lists all ops' launches.

Argument names, in every kernel: ``<t>_ptr`` for tensor ``t``; ``stride_<t>_<dim>`` for its
stride along ``dim`` (``m``/``n``/``r``/``c``/``b``/``k``: rows of the named size, ``d``: the
feature dimension, ``s``: class or column splits, ``v``: the p/q axis of segments); sizes in
capitals (``M``, ``N``, ``D``, ``B``, ``C``, ``R``, ``K``); constexprs ``BLOCK_*`` and flags in
capitals; ``INPUT_PRECISION`` is the ``tl.dot`` input precision.
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import triton
import triton.language as tl

#: The floor of squared distances and squared lengths (docs/method.md, "The forward pass").
EPS = 1e-12
#: ``EPS`` as a constant the ``@triton.jit`` kernels can read.
TL_EPS = tl.constexpr(EPS)

#: float32 operands use TF32 tensor-core dots on a GPU (never under the interpreter).
ALLOW_TF32 = True

#: Triton pointer types of the input dtypes the kernels take.
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

#: The input dtypes of each dtype family of ``CONFIGS``.
FAMILY_DTYPES = {"fp32": (torch.float32,), "half": (torch.float16, torch.bfloat16)}


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def input_precision(dtype: torch.dtype, *, gpu: Optional[bool] = None) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``: TF32 for float32 on a GPU only
    (``gpu``: whether the kernel runs on a GPU; by default, unless the interpreter is on)."""
    gpu = not interpreting() if gpu is None else gpu
    return "tf32" if dtype == torch.float32 and ALLOW_TF32 and gpu else "ieee"


def family(dtype: torch.dtype) -> str:
    """The dtype family of ``CONFIGS``: ``"fp32"`` or ``"half"`` (float16/bfloat16)."""
    return "fp32" if dtype == torch.float32 else "half"


def compute_dtype(op: str, *tensors: torch.Tensor) -> torch.dtype:
    """The dtype the kernels read: the inputs' promotion (float16 + bfloat16 -> float32, never a
    lower precision). float64 never reaches a kernel: ``daal_triton.backend`` sends it to the
    reference, so a direct call with float64 is an error, as is any dtype without a kernel."""
    dtype = tensors[0].dtype
    for t in tensors[1:]:
        dtype = torch.promote_types(dtype, t.dtype)
    if dtype == torch.float64:
        raise ValueError(f"{op}: float64 inputs run on the reference backend (the kernels compute "
                         "in float32); call daal_triton's functions, which route them there")
    if dtype not in POINTER:
        raise ValueError(f"{op} takes float16, bfloat16 or float32 inputs, got {dtype}")
    return dtype


def prepare(t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """``t`` in ``dtype`` with unit column stride (one copy at most)."""
    if t.dtype != dtype:
        t = t.to(dtype)
    if t.stride(-1) != 1 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        t = t.contiguous()
    return t


# --------------------------------------------------------------------------- the model
@dataclass(frozen=True)
class KernelConfig:
    """One launch configuration of a kernel.

    ``blocks``: the tile-size constexprs (``BLOCK_*`` but ``BLOCK_D``, and ``GROUP_M``);
    ``block_d``: ``(smallest, largest)`` D-chunk, powers of two; a launch uses the next power of
    two >= D clamped to that range (``None``: the kernel has no ``BLOCK_D``)."""

    blocks: Dict[str, int]
    num_warps: int
    num_stages: int
    block_d: Optional[Tuple[int, int]] = (16, 64)

    def block_d_for(self, D: int) -> int:
        lo, hi = self.block_d
        return min(hi, max(lo, triton.next_power_of_2(max(int(D), 1))))

    def block_d_choices(self) -> List[Optional[int]]:
        """Every BLOCK_D a launch can use (``[None]`` without BLOCK_D)."""
        if self.block_d is None:
            return [None]
        lo, hi = self.block_d
        return [1 << e for e in range(lo.bit_length() - 1, hi.bit_length())]

    def constexprs(self, block_d: Optional[int]) -> Dict[str, int]:
        return dict(self.blocks) if block_d is None else dict(self.blocks, BLOCK_D=block_d)

    def launch(self, D: Optional[int] = None) -> Dict[str, Any]:
        """Keyword arguments of a kernel launch (tile sizes, BLOCK_D for ``D``, warps, stages)."""
        bd = None if self.block_d is None else self.block_d_for(D)
        return dict(self.constexprs(bd), num_warps=self.num_warps, num_stages=self.num_stages)

    def with_blocks(self, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                    **blocks: int) -> "KernelConfig":
        """A copy with some tile sizes, warps or stages replaced."""
        return replace(self, blocks=dict(self.blocks, **blocks),
                       num_warps=self.num_warps if num_warps is None else num_warps,
                       num_stages=self.num_stages if num_stages is None else num_stages)


def parse_signature(text: str) -> Dict[str, str]:
    """``"a_ptr b_ptr: *x; M N: i32"`` -> ``{"a_ptr": "*x", "b_ptr": "*x", "M": "i32", "N": "i32"}``
    (groups separated by ``;``, order kept)."""
    out = {}
    for group in text.split(";"):
        names, ty = group.split(":")
        out.update((n, ty.strip()) for n in names.split())
    return out


@dataclass(frozen=True)
class KernelSpec:
    """A ``@triton.jit`` kernel and the facts its compile tests need.

    ``signature``: the Triton type of each runtime argument, in order (:func:`parse_signature`
    text); ``*x`` and ``*seg`` stand for pointers of the input and segment dtypes. ``unit`` /
    ``rows`` / ``other``: its stride arguments on the hot path (see the module docstring).
    ``gemm``: whether its hot loop is a tensor-core dot."""

    kernel: Any
    signature_text: str
    unit: Tuple[str, ...] = ()
    rows: Tuple[str, ...] = ()
    other: Tuple[str, ...] = ()
    gemm: bool = True
    signature: Dict[str, str] = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "signature", parse_signature(self.signature_text))

    @property
    def name(self) -> str:
        return getattr(self.kernel, "fn", self.kernel).__name__

    def signature_for(self, x_dtype: torch.dtype, seg_dtype: torch.dtype = torch.float32) -> Dict[str, str]:
        names = {"*x": POINTER[x_dtype], "*seg": POINTER[seg_dtype]}
        return {n: names.get(ty, ty) for n, ty in self.signature.items()}

    def stride_args(self) -> set:
        return {n for n in self.signature if n.startswith("stride_")}


@dataclass(frozen=True)
class Launch:
    """One configuration a launcher can pick on a GPU: ``op``'s kernel ``spec`` for inputs of
    ``x_dtype``, with ``config`` of ``CONFIGS[family][entry]``, ``block_d`` and the other
    constexprs ``flags``."""

    op: str
    family: str
    entry: str
    spec: KernelSpec
    x_dtype: torch.dtype
    config: KernelConfig
    block_d: Optional[int]
    flags: Dict[str, Any]

    @property
    def name(self) -> str:
        bd = "" if self.block_d is None else f"-bd{self.block_d}"
        return f"{self.op}_{self.entry}-{POINTER[self.x_dtype][1:]}{bd}"

    @property
    def kernel(self):
        return self.spec.kernel

    @property
    def signature(self) -> Dict[str, str]:
        return self.spec.signature_for(self.x_dtype)

    @property
    def constexprs(self) -> Dict[str, Any]:
        return dict(self.config.constexprs(self.block_d), **self.flags)

    @property
    def num_warps(self) -> int:
        return self.config.num_warps

    @property
    def num_stages(self) -> int:
        return self.config.num_stages

    @property
    def gemm(self) -> bool:
        return self.spec.gemm


def expand(op: str, configs: Mapping[str, Mapping[str, KernelConfig]],
           specs: Mapping[str, KernelSpec], flags) -> List[Launch]:
    """Every :class:`Launch` of ``configs[family][entry]`` (GPU families only), for each dtype of
    the family and each BLOCK_D; ``specs[entry]`` is the entry's kernel and ``flags(entry,
    dtype)`` its other constexprs (as the launcher sets them on a GPU)."""
    out = []
    for fam, entries in configs.items():
        for dtype in FAMILY_DTYPES.get(fam, ()):
            for entry, cfg in entries.items():
                out += [Launch(op, fam, entry, specs[entry], dtype, cfg, bd, flags(entry, dtype))
                        for bd in cfg.block_d_choices()]
    return out


def every_launch() -> List[Launch]:
    """The launches of all three operators (what the compile tests build)."""
    from . import knn, line_margin, pairwise

    return pairwise.launches() + knn.launches() + line_margin.launches()


def every_spec() -> List[KernelSpec]:
    """The spec of every kernel of the three operators."""
    from . import knn, line_margin, pairwise

    return [*pairwise.KERNELS.values(), *knn.KERNELS.values(), *line_margin.KERNELS.values()]


# --------------------------------------------------------------------------- shared kernels
@triton.jit
def _dot_rows(a_rows, b_rows, amask, bmask, D, acc, BLOCK_D: tl.constexpr,
              INPUT_PRECISION: tl.constexpr):
    """``acc + A B^T`` for a block of rows of A and of B (unit column stride), over D in
    BLOCK_D chunks: one ``tl.dot`` per chunk, float32 accumulation.

    Args:
        a_rows, b_rows: pointers to the first element of each row of the two blocks.
        amask, bmask: which rows of each block exist.
        D: the row length. acc: the float32 accumulator, rows of A x rows of B.
        BLOCK_D: the D-chunk. INPUT_PRECISION: ``tl.dot``'s input precision.
    """
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        dmask = dd < D
        a = tl.load(a_rows + dd[None, :], mask=amask[:, None] & dmask[None, :], other=0.0)
        b = tl.load(b_rows + dd[None, :], mask=bmask[:, None] & dmask[None, :], other=0.0)
        acc = tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)
    return acc


@triton.jit
def _sqnorm_kernel(x_ptr, out_ptr, M, D, stride_x_m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr):
    """``out_i = sum_d x_id^2`` in float32.

    Args:
        x_ptr: M x D input, unit column stride.
        out_ptr: M float32 outputs.
        M, D: sizes.
        stride_x_m: row stride of x.
        BLOCK_M: rows per program. BLOCK_D: D-chunk of the loop.
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_x_m
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + dd[None, :], mask=rmask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        acc += tl.sum(x * x, axis=1)
    tl.store(out_ptr + rows, acc, mask=rmask)


SQNORM = KernelSpec(_sqnorm_kernel, "x_ptr: *x; out_ptr: *fp32; M D: i32; stride_x_m: i64",
                    rows=("stride_x_m",), gemm=False)
SQNORM_CONFIG = KernelConfig({"BLOCK_M": 64}, num_warps=4, num_stages=1, block_d=(64, 64))


def row_sqnorms(x: torch.Tensor) -> torch.Tensor:
    """``||x_i||^2`` in float32 for a prepared ``x`` (M x D, unit column stride)."""
    M, D = x.shape
    out = torch.empty(M, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    grid = (triton.cdiv(M, SQNORM_CONFIG.blocks["BLOCK_M"]),)
    _sqnorm_kernel[grid](x, out, M, D, x.stride(0), **SQNORM_CONFIG.launch(D))
    return out
