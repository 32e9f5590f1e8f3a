"""What the kernel modules share (pairwise, knn, line_margin, normalize, density, combine):
constants, the dtype rule, input preparation, the ``@triton.jit`` helpers, and the one
launch-configuration model.

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

import functools
import os
import threading
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Mapping, Optional, Tuple

import torch
import triton
import triton.language as tl

#: The floor of squared distances and squared lengths (docs/method.md, "The forward pass").
EPS = 1e-12
#: ``EPS`` as a constant the ``@triton.jit`` kernels can read.
TL_EPS = tl.constexpr(EPS)

#: Triton pointer types of the input dtypes the kernels take.
POINTER = {torch.float32: "*fp32", torch.float16: "*fp16", torch.bfloat16: "*bf16"}

#: The input dtypes of each dtype family of ``CONFIGS``.
FAMILY_DTYPES = {"fp32": (torch.float32,), "half": (torch.float16, torch.bfloat16)}


#: CUDA's limit on a launch grid's second and third dimensions (gridDim.y, gridDim.z; the first
#: goes to 2^31 - 1): a count that can grow with the data goes on the first axis, or is capped.
MAX_GRID_YZ = 65535


def cdiv(a: int, b: int) -> int:
    """``ceil(a / b)`` for host code (``triton.cdiv`` is a ``constexpr_function`` in Triton 3.8,
    ~10x the cost of this on every launch)."""
    return -(-a // b)


def next_pow2(n: int) -> int:
    """The smallest power of two >= ``n`` (0 for ``n <= 0``, as ``triton.next_power_of_2``), for
    host code (as :func:`cdiv`)."""
    n = int(n)
    return 1 << (n - 1).bit_length() if n > 0 else 0


def _triton_interprets() -> bool:
    """``TRITON_INTERPRET`` read by Triton's own knob, as ``triton.jit`` reads it (``false``,
    ``off``, ``no``: compiled kernels); the spelling it accepts where there is no knob."""
    knobs = getattr(triton, "knobs", None)
    if knobs is not None and hasattr(knobs, "runtime"):
        return bool(knobs.runtime.interpret)
    return os.environ.get("TRITON_INTERPRET", "").lower() in ("1", "true", "on", "yes", "y")


#: ``TRITON_INTERPRET`` as Triton read it when this module imported it: ``triton.jit`` decides
#: then whether a kernel is interpreted, so a later change of the variable changes nothing.
_INTERPRET = _triton_interprets()


def interpreting() -> bool:
    """Whether Triton's interpreter runs the kernels (``TRITON_INTERPRET=1`` when triton was
    imported)."""
    return _INTERPRET


#: ``tl.dot``'s input precision for float32 operands on a GPU, by
#: ``torch.get_float32_matmul_precision()`` (docs/method.md, "Numerics"): ``"highest"`` (PyTorch's
#: default) asks for float32 accuracy, which 3xTF32 gives on the tensor cores (each operand split
#: into a rounded TF32 high part and a TF32 remainder, three MMAs); ``"high"`` and ``"medium"``
#: allow one TF32 pass, on operands rounded to TF32 first (:func:`round_operands`).
FP32_DOT = {"highest": "tf32x3", "high": "tf32", "medium": "tf32"}
#: Every precision a launcher can pass for float32 operands on a GPU (the compile tests build each).
FP32_GPU_PRECISIONS = ("tf32x3", "tf32")


#: The first GPUs with TF32 tensor cores: sm_80 (Ampere). On older ones (sm_70, sm_75) float32 dots
#: run as IEEE FMAs whatever the matmul precision, as ``torch.matmul`` runs them there: ``"tf32"``
#: does not build for them (``cvt.rna.tf32`` needs sm_80) and ``"tf32x3"`` would triple the FMAs.
TF32_CAPABILITY = (8, 0)

_CAPABILITY: Dict[int, Tuple[int, int]] = {}


def device_capability(device: torch.device) -> Tuple[int, int]:
    """``(major, minor)`` compute capability of a CUDA ``device``, looked up once per device;
    ``(0, 0)`` for any other device."""
    if device.type != "cuda":
        return (0, 0)
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _CAPABILITY:
        _CAPABILITY[idx] = tuple(torch.cuda.get_device_capability(idx))  # type: ignore[assignment]
    return _CAPABILITY[idx]


def input_precision(dtype: torch.dtype, *, gpu: Optional[bool] = None,
                    matmul_precision: Optional[str] = None, device: Optional[torch.device] = None) -> str:
    """``tl.dot``'s input precision for operands of ``dtype``.

    float32 on a GPU follows ``torch.get_float32_matmul_precision()`` (or ``matmul_precision``)
    through :data:`FP32_DOT`: ``"tf32x3"`` for ``"highest"``, ``"tf32"`` for ``"high"`` /
    ``"medium"``; under the interpreter (and for float16/bfloat16 operands, where Triton ignores
    it) ``"ieee"``. ``gpu``: whether the kernel runs on a GPU (by default, unless the interpreter
    is on). ``device``: the tensors' device, where known: a GPU without TF32 (before sm_80,
    :data:`TF32_CAPABILITY`) gets ``"ieee"``; without it, one with TF32 is assumed (the compile
    targets). A kernel given ``"tf32"`` must round its float32 operands to TF32 before the dot
    (:func:`round_operands`, :func:`_round_tf32`): the tensor cores truncate raw float32 bits.
    """
    gpu = not interpreting() if gpu is None else gpu
    if dtype != torch.float32 or not gpu:
        return "ieee"
    if device is not None and device_capability(device) < TF32_CAPABILITY:
        return "ieee"
    return FP32_DOT[matmul_precision or matmul_setting()]


def matmul_setting() -> str:
    """What cuBLAS does for float32 matmuls, as ``torch.get_float32_matmul_precision()`` names it:
    the newer ``torch.backends.cuda.matmul.fp32_precision`` (PyTorch >= 2.9) where it is set
    (``"tf32"`` -> ``"high"``, ``"ieee"`` -> ``"highest"``: it is what cuBLAS follows, and after
    ``set_float32_matmul_precision("high")`` then ``fp32_precision = "ieee"`` the legacy getter
    still answers "high"), else the legacy getter; where PyTorch refuses to answer that (the two
    APIs mixed), ``"highest"``."""
    fp32 = getattr(getattr(torch.backends.cuda, "matmul", None), "fp32_precision", None)
    if fp32 in ("tf32", "ieee"):
        return "high" if fp32 == "tf32" else "highest"
    try:
        return torch.get_float32_matmul_precision()
    except RuntimeError:
        return "highest"


def round_operands(precision: str) -> bool:
    """Whether a kernel whose dots use ``precision`` rounds its float32 operands (and the values
    its norms are taken of) to TF32 first: the ``ROUND_TF32`` constexpr, true for ``"tf32"``
    only (``"tf32x3"`` rounds its own split, ``"ieee"`` needs none; never under the interpreter,
    where ``input_precision`` is ``"ieee"``)."""
    return precision == "tf32"


def dot_flags(dtype: torch.dtype, *, gpu: Optional[bool] = None, matmul_precision: Optional[str] = None,
              device: Optional[torch.device] = None) -> Dict[str, Any]:
    """The constexprs ``INPUT_PRECISION`` and ``ROUND_TF32`` of a kernel whose dot operands have
    ``dtype``, as a launcher passes them now for tensors on ``device`` (see :func:`input_precision`)."""
    prec = input_precision(dtype, gpu=gpu, matmul_precision=matmul_precision, device=device)
    return {"INPUT_PRECISION": prec, "ROUND_TF32": round_operands(prec) and dtype == torch.float32}


def gpu_dot_variants(dtype: torch.dtype) -> List[Dict[str, Any]]:
    """Every :func:`dot_flags` a launcher can pass on a GPU for operands of ``dtype`` (one per
    float32 matmul-precision mode; one for float16/bfloat16): what ``launches()`` lists."""
    settings = list(FP32_DOT) if dtype == torch.float32 else ["highest"]
    out = []
    for setting in settings:
        fl = dot_flags(dtype, gpu=True, matmul_precision=setting)
        if fl not in out:
            out.append(fl)
    return out


def family(dtype: torch.dtype) -> str:
    """The dtype family of ``CONFIGS``: ``"fp32"`` or ``"half"`` (float16/bfloat16)."""
    return "fp32" if dtype == torch.float32 else "half"


def config_family(x_dtype: torch.dtype, *, interpret: Optional[bool] = None) -> str:
    """The ``CONFIGS`` family a launcher uses for inputs of ``x_dtype``: ``"interp"`` under the
    interpreter (for the ops that have one: few, large blocks), else :func:`family`."""
    interpret = interpreting() if interpret is None else interpret
    return "interp" if interpret else family(x_dtype)


_SM_COUNT: Dict[int, int] = {}


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (1 on the CPU: the interpreter runs programs one by
    one, so the fewest programs is fastest there)."""
    if device.type != "cuda":
        return 1
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]


@functools.lru_cache(maxsize=1024)  # a pure function of its arguments; up to 1024 candidates each
def wave_split(row_tiles: int, col_tiles: int, sms: int, max_splits: Optional[int] = None,
               overhead_tiles: float = 0.0, one_split_saves: float = 0.0) -> int:
    """The number of column splits ``S`` of a (row tiles x S) grid that minimises the modelled time
    ``ceil(row_tiles S / sms) * (ceil(col_tiles / S) + overhead_tiles)`` (waves x the longest
    program: its tiles and a fixed cost per program, in tiles; the grid in whole waves of the
    device's SMs); ties go to fewer splits (less merging). ``one_split_saves``: what one split
    saves besides (a launch of the splits' merge it makes unnecessary, in tiles): 1 wherever its
    modelled time is at most that much above the best."""
    best, best_cost, one_cost = 1, None, None
    limit = col_tiles if max_splits is None else min(max_splits, col_tiles)
    for s in range(1, max(1, limit) + 1):
        cost = -(-row_tiles * s // sms) * (-(-col_tiles // s) + overhead_tiles)
        if best_cost is None or cost < best_cost:
            best, best_cost = s, cost
        if s == 1:
            one_cost = cost
    return 1 if one_cost <= best_cost + one_split_saves else best  # type: ignore[operator]  # s = 1 set both


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


#: The GEMM-form operators (kNN, pairwise distance) hand their kernels rows whose width and
#: stride are multiples of :data:`ALIGN` elements and whose start is 16-byte aligned
#: (:func:`prepare` with ``align``): Triton then marks D and the strides divisible by 16 and
#: loads 16-byte vectors; at any other D (e.g. 129, 100) every element is loaded with an address
#: of its own and the sm_90 builds spill (bfloat16 kNN backward 744 B, its finish 256 B, the
#: pairwise backward 64 B, the forwards 48-56 B; none at D a multiple of 16:
#: tests/kernels/test_kernel_launched_builds.py). The padding columns are zeros: they add
#: nothing to a dot product or a squared distance, and the D-chunks are the same, so the results
#: are those of the unpadded kernels. Cost: one copy of the (M + N) x D inputs per call, against
#: the M x N x D work, and two more launches per input (a zero fill and a copy) in the forward,
#: again in the backward, and one per gradient (its D columns): the pairwise distance's forward
#: and backward at D = 129 launch 18 kernels padded, 8 not. Where the H200 runs timed the
#: unpadded rows faster, the operator reads them as they are: :data:`ALIGN_DEFAULT`.
ALIGN = 16
ALIGN_ENV = "DAAL_ALIGN_D"
#: ``DAAL_ALIGN_D``: "auto" (unset) pads where the operator's :data:`ALIGN_DEFAULT` says so;
#: "pad" pads for every operator, "off" for none (the unaligned rows as before 2026-12-02).
ALIGN_POLICIES = ("auto", "pad", "off")
#: Whether "auto" pads, by operator. The kNN pads: the H200 runs timed it against ``off`` split
#: (bench/README.md, still timed: the benchmarks' ``triton_unaligned`` provider). The pairwise
#: distance does not: all three runs of 2026-12-04 timed its unpadded rows faster (the 4,096 x
#: 4,096 forward and backward at D = 129, 0.63-0.89x the padded time) and leaner
#: (bench/README.md, "Switches decided"). (Their unpadded builds keep no stack under Triton 3.6,
#: the runs'; 3.8 spills 64 B in the backward.)
ALIGN_DEFAULT = {"knn": True, "pairwise": False}


def aligned(t: torch.Tensor) -> bool:
    """Whether the 2-D ``t`` has unit column stride and Triton's launcher marks its width, row
    stride and pointer divisible by 16 (the vectorised builds)."""
    return (t.stride(-1) == 1 and t.shape[1] % ALIGN == 0 and t.stride(0) % ALIGN == 0
            and t.data_ptr() % 16 == 0)


def align_rows(op: str) -> bool:
    """Whether operator ``op`` ("knn", "pairwise") pads its rows: ``DAAL_ALIGN_D`` (one of
    :data:`ALIGN_POLICIES`, "auto" when unset: :data:`ALIGN_DEFAULT`; ``ValueError`` for another
    value). Read by each forward; its backward follows the forward's choice (saved by its
    ``setup_context``), as the benchmarks' providers set it around the forward."""
    policy = env_choice(ALIGN_ENV, ALIGN_POLICIES)
    return ALIGN_DEFAULT[op] if policy == "auto" else policy == "pad"


def prepare(t: torch.Tensor, dtype: torch.dtype, align: bool = False) -> torch.Tensor:
    """``t`` in ``dtype`` with unit column stride (one copy at most). With ``align`` (the
    callers pass :func:`align_rows`, or the forward's choice) also :func:`aligned`: an M x D ``t``
    that is not comes back as M x ``ceil(D / 16) * 16``, its columns beyond D zeros (still one
    copy)."""
    if align and not aligned(t):
        M, D = t.shape
        out = torch.empty(M, cdiv(D, ALIGN) * ALIGN, dtype=dtype, device=t.device)
        out[:, D:].zero_()
        out[:, :D].copy_(t)
        return out
    if t.stride(-1) != 1 or (t.shape[0] > 1 and t.stride(0) < t.shape[1]):
        # cast and lay out in one copy (a plain .to() keeps a transposed tensor's strides; with
        # the dtype unchanged .to() returns t whatever the memory format asked)
        return t.contiguous() if t.dtype == dtype else t.to(dtype, memory_format=torch.contiguous_format)
    return t.to(dtype)  # t itself when it is in dtype


def columns(t: torch.Tensor, D: int, dtype: torch.dtype) -> torch.Tensor:
    """The first ``D`` columns of a result computed on :func:`prepare`'s padded rows, in
    ``dtype``, contiguous (``t`` itself when nothing changes)."""
    return (t[:, :D] if t.shape[1] != D else t).to(dtype).contiguous()


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
    #: ptxas's register cap per thread (Triton's ``maxnreg`` option; None: the compiler's choice)
    maxnreg: Optional[int] = None
    #: ``launch``'s keyword arguments by D (filled on first use: a launch costs one dict copy)
    _launch_kwargs: Dict[Optional[int], Dict[str, Any]] = field(
        init=False, default_factory=dict, compare=False, repr=False)

    def block_d_for(self, D: int) -> int:
        lo, hi = self.block_d  # type: ignore[misc]  # only configs with a BLOCK_D range
        return min(hi, max(lo, next_pow2(max(int(D), 1))))

    def block_d_choices(self) -> List[Optional[int]]:
        """Every BLOCK_D a launch can use (``[None]`` without BLOCK_D)."""
        if self.block_d is None:
            return [None]
        lo, hi = self.block_d
        return [1 << e for e in range(lo.bit_length() - 1, hi.bit_length())]

    def constexprs(self, block_d: Optional[int]) -> Dict[str, int]:
        return dict(self.blocks) if block_d is None else dict(self.blocks, BLOCK_D=block_d)

    def launch(self, D: Optional[int] = None) -> Dict[str, Any]:
        """Keyword arguments of a kernel launch (tile sizes, BLOCK_D for ``D``, warps, stages, and
        the register cap where one is set)."""
        kwargs = self._launch_kwargs.get(D)
        if kwargs is None:
            bd = None if self.block_d is None else self.block_d_for(D)  # type: ignore[arg-type]
            kwargs = dict(self.constexprs(bd), num_warps=self.num_warps, num_stages=self.num_stages)
            if self.maxnreg is not None:
                kwargs["maxnreg"] = self.maxnreg
            self._launch_kwargs[D] = kwargs
        return dict(kwargs)

    def with_blocks(self, num_warps: Optional[int] = None, num_stages: Optional[int] = None,
                    maxnreg: Any = ..., **blocks: int) -> "KernelConfig":
        """A copy with some tile sizes, warps, stages or the register cap (None: none) replaced."""
        return replace(self, blocks=dict(self.blocks, **blocks),
                       num_warps=self.num_warps if num_warps is None else num_warps,
                       num_stages=self.num_stages if num_stages is None else num_stages,
                       maxnreg=self.maxnreg if maxnreg is ... else maxnreg)


def descriptor_type(x_dtype: torch.dtype, rows: int, block_d: int) -> str:
    """Triton's type of a host tensor descriptor of ``x_dtype`` with block ``rows x block_d``
    (what its JIT derives from a ``triton.tools.tensor_descriptor.TensorDescriptor``; the same
    text in Triton 3.6 and 3.8: tests/kernels/test_kernel_specialisation.py)."""
    return f"tensordesc<{POINTER[x_dtype][1:]}[{int(rows)}, {int(block_d)}]>"


def parse_signature(text: str) -> Dict[str, str]:
    """``"a_ptr b_ptr: *x; M N: i32"`` -> ``{"a_ptr": "*x", "b_ptr": "*x", "M": "i32", "N": "i32"}``
    (groups separated by ``;``, order kept)."""
    out: Dict[str, str] = {}
    for group in text.split(";"):
        names, ty = group.split(":")
        out.update((n, ty.strip()) for n in names.split())
    return out


@dataclass(frozen=True)
class KernelSpec:
    """A ``@triton.jit`` kernel and the facts its compile tests need.

    ``signature``: the Triton type of each runtime argument, in order (:func:`parse_signature`
    text); ``*x`` and ``*seg`` stand for pointers of the input and segment dtypes, ``*h`` for an
    intermediate whose dtype ``h_dtype(x_dtype)`` gives (the pairwise backward's ``H``);
    ``desc[BLOCK_M]`` for a tensor descriptor of the input dtype, block ``BLOCK_M x BLOCK_D``,
    present only in launches with ``TMA = True`` (otherwise the argument is the constant None:
    :meth:`Launch.constexprs`). ``unit`` /
    ``rows`` / ``other``: its stride arguments on the hot path (see the module docstring).
    ``gemm``: whether its hot loop is a tensor-core dot."""

    kernel: Any
    signature_text: str
    unit: Tuple[str, ...] = ()
    rows: Tuple[str, ...] = ()
    other: Tuple[str, ...] = ()
    gemm: bool = True
    h_dtype: Any = None
    signature: Dict[str, str] = field(init=False, compare=False)

    def __post_init__(self):
        object.__setattr__(self, "signature", parse_signature(self.signature_text))

    @property
    def name(self) -> str:
        return getattr(self.kernel, "fn", self.kernel).__name__

    def signature_for(self, x_dtype: torch.dtype, seg_dtype: torch.dtype = torch.float32,
                      constexprs: Optional[Mapping[str, Any]] = None) -> Dict[str, str]:
        """The runtime arguments' Triton types for these dtypes; a launch's ``constexprs`` give
        the descriptors' block shapes (``TMA = True``) or drop them (otherwise: constants)."""
        names = {"*x": POINTER[x_dtype], "*seg": POINTER[seg_dtype]}
        if self.h_dtype is not None:
            names["*h"] = POINTER[self.h_dtype(x_dtype)]
        out: Dict[str, str] = {}
        for n, ty in self.signature.items():
            if ty.startswith("desc["):
                if not (constexprs or {}).get("TMA"):
                    continue
                ty = descriptor_type(x_dtype, constexprs[ty[5:-1]], constexprs["BLOCK_D"])  # type: ignore[index]
            out[n] = names.get(ty, ty)
        return out

    def descriptors(self) -> Tuple[str, ...]:
        """The tensor-descriptor arguments (``desc[...]`` in the signature)."""
        return tuple(n for n, ty in self.signature.items() if ty.startswith("desc["))

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
        """``<op>_<entry>-<dtype>[-bd<BLOCK_D>][-tf32]``: the suffix marks the single-pass TF32
        variant of a float32 launch (``"high"``/``"medium"``); the plain name is the default."""
        bd = "" if self.block_d is None else f"-bd{self.block_d}"
        return f"{self.op}_{self.entry}-{POINTER[self.x_dtype][1:]}{bd}{self.variant}"

    @property
    def variant(self) -> str:
        """``"-tf32"`` for a launch with single-pass TF32 dots or TF32-rounded norms; ``"-atomic"``
        for the line margin's atomic own-class rows (``ATOMIC=True`` / ``HAS_OWN=False``: the
        design ``DAAL_LM_OWN_SEG=atomic`` keeps selectable); ``"-pairs"`` for the kNN backward's
        per-pair dRef (``DR_PAIRS=True``: under deterministic algorithms); ``"-lse"`` for the line
        margin forward that also merges its one split (``LSE=True``); ``"-finish"`` for the kNN
        forward that finishes its one split (``FINISH=True``); ``"-tma"`` for the kNN forward's
        tensor-descriptor loads (``TMA=True``: ``DAAL_KNN_LOADS=tma``, and every launch of the
        wide entry, ``DAAL_KNN_TILES=wide``); ``"-checked"`` for the
        kNN forward's checked merge (``COUNTED=False``: ``DAAL_KNN_MERGE=checked``); ``"-plain"``
        for the kNN forward's earlier epilogue (``LEAN=False``: ``DAAL_KNN_EPILOGUE=plain``; float32's
        only one, so unmarked there); ``"-padded"`` for the squared norms padded with ``inf`` to
        whole tiles (``PAD_INF=True``: the kNN forward's lean epilogue reads them)."""
        tf32 = self.flags.get("INPUT_PRECISION") == "tf32" or self.flags.get("ROUND_TF32")
        atomic = self.flags.get("ATOMIC") is True or self.flags.get("HAS_OWN") is False
        return (("-tf32" if tf32 else "") + ("-atomic" if atomic else "")
                + ("-lse" if self.flags.get("LSE") else "")
                + ("-finish" if self.flags.get("FINISH") else "")
                + ("-tma" if self.flags.get("TMA") else "")
                + ("-pairs" if self.flags.get("DR_PAIRS") else "")
                + ("-checked" if self.flags.get("COUNTED") is False else "")
                + ("-plain" if self.flags.get("LEAN") is False and self.x_dtype != torch.float32 else "")
                + ("-padded" if self.flags.get("PAD_INF") else ""))

    @property
    def aligned_hopper_only(self) -> bool:
        """Whether the launcher picks this launch only on sm_90+ with 16-byte-aligned rows (the
        kNN forward's tensor-descriptor loads): the compile tests build it for that alone."""
        return bool(self.flags.get("TMA"))

    @property
    def kernel(self):
        return self.spec.kernel

    @property
    def signature(self) -> Dict[str, str]:
        return self.spec.signature_for(self.x_dtype, constexprs=self.constexprs)

    @property
    def constexprs(self) -> Dict[str, Any]:
        out = dict(self.config.constexprs(self.block_d), **self.flags)
        if not out.get("TMA"):  # pointer loads: the descriptor arguments are None
            out.update((n, None) for n in self.spec.descriptors())
        return out

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
    dtype)`` its other constexprs (as the launcher sets them on a GPU): a dict, or a list of
    dicts when the launcher picks among several (the float32 precision variants)."""
    out = []
    for fam, entries in configs.items():
        for dtype in FAMILY_DTYPES.get(fam, ()):
            for entry, cfg in entries.items():
                variants = flags(entry, dtype)
                for fl in variants if isinstance(variants, list) else [variants]:
                    out += [Launch(op, fam, entry, specs[entry], dtype, cfg, bd, fl)
                            for bd in cfg.block_d_choices()]
    return out


def every_launch() -> List[Launch]:
    """The launches of every kernel module's ``launches()`` (what the compile tests build)."""
    from . import combine, density, knn, line_margin, normalize, pairwise

    return (pairwise.launches() + knn.launches() + line_margin.launches() + normalize.launches()
            + density.launches() + combine.launches())


def every_spec() -> List[KernelSpec]:
    """The spec of every kernel of those modules."""
    from . import combine, density, knn, line_margin, normalize, pairwise

    return [*pairwise.KERNELS.values(), *knn.KERNELS.values(), *line_margin.KERNELS.values(),
            *normalize.KERNELS.values(), *density.KERNELS.values(), *combine.KERNELS.values()]


# --------------------------------------------------------------------------- shared kernels
@triton.jit
def _log1p(s):
    """``log(1 + s)`` for ``s >= 0`` at float32 accuracy, also where ``1 + s`` rounds ``s``'s digits
    off (``log(1 + 3e-7)`` reads 3.58e-7): below 0.5 the series ``2 atanh(z) = 2 (z + z^3/3 + ...
    + z^11/11)``, ``z = s / (2 + s) <= 0.2`` (truncation below 3.3e-10 relative, ~12 FMAs); above,
    ``log(1 + s)`` (at least 0.405: its rounding stays relative). NaN stays NaN, inf gives inf."""
    z = s / (2.0 + s)
    z2 = z * z
    poly = 1.0 + z2 * (0.3333333333333333 + z2 * (0.2 + z2 * (0.14285714285714285 + z2 * (
        0.1111111111111111 + z2 * 0.09090909090909091))))
    return tl.where(s < 0.5, 2.0 * z * poly, tl.log(1.0 + s))


@triton.jit
def _one_minus_exp_neg(x):
    """``1 - exp(-x)`` (``-expm1(-x)``) for ``x >= 0`` at float32 accuracy, also for small ``x``
    (where the subtraction cancels: ``1 - exp(-1.6e-4)`` is 5e-5 off in float32): below 0.5 the
    Taylor series through ``x^9 / 9!`` in Horner form (truncation below 6.6e-10 relative), above,
    ``1 - exp(-x)`` (at least 0.39). NaN stays NaN, inf gives 1."""
    poly = 1.0 - x * 0.5 * (1.0 - x * 0.3333333333333333 * (1.0 - x * 0.25 * (1.0 - x * 0.2 * (
        1.0 - x * 0.16666666666666666 * (1.0 - x * 0.14285714285714285 * (1.0 - x * 0.125 * (
            1.0 - x * 0.1111111111111111)))))))
    return tl.where(x < 0.5, x * poly, 1.0 - tl.exp(-x))


@triton.jit
def _round_tf32(x, ROUND_TF32: tl.constexpr):
    """``x`` rounded to TF32 (10 mantissa bits, round to nearest, ties away: ``cvt.rna.tf32.f32``)
    when ``ROUND_TF32``, else ``x`` unchanged (no instruction). Only float32 ``x`` with
    ``ROUND_TF32``; never under the interpreter (no inline assembly there)."""
    if ROUND_TF32:
        x = tl.inline_asm_elementwise("cvt.rna.tf32.f32 $0, $1;", "=r,r", [x], dtype=tl.float32,
                                      is_pure=True, pack=1)
    return x


@triton.jit
def _dot_rows(a_rows, b_rows, amask, bmask, D, acc, BLOCK_D: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr = False):
    """``acc + A B^T`` for a block of rows of A and of B (unit column stride), over D in
    BLOCK_D chunks: one ``tl.dot`` per chunk, float32 accumulation.

    Args:
        a_rows, b_rows: pointers to the first element of each row of the two blocks.
        amask, bmask: which rows of each block exist.
        D: the row length. acc: the float32 accumulator, rows of A x rows of B.
        BLOCK_D: the D-chunk. INPUT_PRECISION: ``tl.dot``'s input precision.
        ROUND_TF32: round float32 operands to TF32 before the dot (``round_operands``).
    """
    for d0 in range(0, D, BLOCK_D):
        acc = _dot_chunk(a_rows, b_rows, amask, bmask, d0, D, acc, BLOCK_D, INPUT_PRECISION, ROUND_TF32)
    return acc


@triton.jit
def _dot_chunk(a_rows, b_rows, amask, bmask, d0, D, acc, BLOCK_D: tl.constexpr,
               INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr = False):
    """One step of :func:`_dot_rows`: ``acc + A[:, d0:d0+BLOCK_D] B[:, d0:d0+BLOCK_D]^T``
    (arguments as there; ``d0``: the chunk's first column)."""
    dd = d0 + tl.arange(0, BLOCK_D)
    dmask = dd < D
    a = tl.load(a_rows + dd[None, :], mask=amask[:, None] & dmask[None, :], other=0.0)
    b = tl.load(b_rows + dd[None, :], mask=bmask[:, None] & dmask[None, :], other=0.0)
    a = _round_tf32(a, ROUND_TF32)
    b = _round_tf32(b, ROUND_TF32)
    return tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _dot_desc_chunk(a_desc, b_desc, a0, b0, d0, acc, INPUT_PRECISION: tl.constexpr,
                    ROUND_TF32: tl.constexpr = False):
    """:func:`_dot_chunk` through tensor descriptors (TMA on sm_90): ``acc + A[a0:, d0:]
    B[b0:, d0:]^T`` for the descriptors' block shapes (rows x BLOCK_D); rows and columns past
    the descriptors' shapes read 0 (the hardware's bounds), so no mask is computed."""
    a = _round_tf32(a_desc.load([a0, d0]), ROUND_TF32)
    b = _round_tf32(b_desc.load([b0, d0]), ROUND_TF32)
    return tl.dot(a, tl.trans(b), acc, input_precision=INPUT_PRECISION)


@triton.jit
def _dot_tile(q_rows, r_ptr, q_desc, r_desc, row_lo, n0, cols, rmask, cmask, D, stride_r_n,
              BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
              INPUT_PRECISION: tl.constexpr, ROUND_TF32: tl.constexpr, TMA: tl.constexpr):
    """A tile of the GEMM form's dots, ``Q[row_lo:+BLOCK_M] R[n0:+BLOCK_N]^T`` (float32, over all
    of D in BLOCK_D chunks): through the tensor descriptors with ``TMA`` (:func:`_dot_desc_chunk`),
    else through pointer loads from ``q_rows`` and the rows ``cols`` of ``r_ptr``
    (:func:`_dot_rows`, masked by ``rmask``/``cmask``). The kNN forward's, its threshold filter's
    and the probe's tiles."""
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    if TMA:
        for d0 in range(0, D, BLOCK_D):
            acc = _dot_desc_chunk(q_desc, r_desc, row_lo, n0, d0, acc, INPUT_PRECISION, ROUND_TF32)
    else:
        acc = _dot_rows(q_rows, r_ptr + cols.to(tl.int64)[:, None] * stride_r_n, rmask, cmask, D,
                        acc, BLOCK_D, INPUT_PRECISION, ROUND_TF32)
    return acc


@triton.jit
def _sqnorm_kernel(x_ptr, out_ptr, M, D, stride_x_m, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
                   ROUND_TF32: tl.constexpr, PAD_INF: tl.constexpr):
    """``out_i = sum_d x_id^2`` in float32 (of ``x`` rounded to TF32 with ``ROUND_TF32``: the
    values a single-pass TF32 dot sees).

    Args:
        x_ptr: M x D input, unit column stride.
        out_ptr: M float32 outputs.
        M, D: sizes.
        stride_x_m: row stride of x.
        BLOCK_M: rows per program. BLOCK_D: D-chunk of the loop. ROUND_TF32: see above.
        PAD_INF: ``out`` has one entry per row of the grid (a whole number of BLOCK_M past M):
            ``inf`` past M (the kNN forward's lean epilogue reads whole tiles of norms).
    """
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < M
    base = x_ptr + rows.to(tl.int64)[:, None] * stride_x_m
    acc = tl.zeros([BLOCK_M], dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        dd = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(base + dd[None, :], mask=rmask[:, None] & (dd[None, :] < D), other=0.0).to(tl.float32)
        x = _round_tf32(x, ROUND_TF32)
        acc += tl.sum(x * x, axis=1)
    if PAD_INF:
        tl.store(out_ptr + rows, tl.where(rmask, acc, float("inf")))
    else:
        tl.store(out_ptr + rows, acc, mask=rmask)


SQNORM = KernelSpec(_sqnorm_kernel, "x_ptr: *x; out_ptr: *fp32; M D: i32; stride_x_m: i64",
                    rows=("stride_x_m",), gemm=False)
SQNORM_CONFIG = KernelConfig({"BLOCK_M": 64}, num_warps=4, num_stages=1, block_d=(64, 64))


def row_sqnorms(x: torch.Tensor, precision: str = "ieee", pad: int = 1) -> torch.Tensor:
    """``||x_i||^2`` in float32 for a prepared ``x`` (M x D, unit column stride), of the values
    a dot of input ``precision`` sees (rounded to TF32 for ``"tf32"``: :func:`round_operands`).
    ``pad`` > 1 (a multiple of the kernel's BLOCK_M, 64): ``cdiv(M, pad) * pad`` entries, ``inf``
    past M, written by the same launch."""
    M, D = x.shape
    bm = SQNORM_CONFIG.blocks["BLOCK_M"]
    if pad < 1 or (pad > 1 and pad % bm):
        raise ValueError(f"pad must be 1 or a multiple of {bm}, got {pad}")
    out = torch.empty(cdiv(M, pad) * pad, dtype=torch.float32, device=x.device)
    if M == 0:
        return out
    grid = (cdiv(out.shape[0], bm),)
    _sqnorm_kernel[grid](x, out, M, D, x.stride(0),
                         ROUND_TF32=round_operands(precision) and x.dtype == torch.float32,
                         PAD_INF=pad > 1, **SQNORM_CONFIG.launch(D))
    return out


# ----------------------------------------------------------------------------- merged launches
#: Whether the operators merge independent kernels into one launch where they can: ``"merged"`` (the
#: default; the line margin's own-class rows and class statistics in one launch, its forward's merge
#: inside the GEMM kernel when the grid has one class split, the last chunk's segment epilogue with
#: the dX kernel; docs/kernels.md, "Fewer launches") or ``"separate"`` (``DAAL_LAUNCHES=separate``:
#: one launch per kernel, as before 2026-12-01's evening; decided by the GPU runs for the default
#: (bench/README.md, "Switches decided"), still selectable, no longer timed: the benchmarks'
#: ``triton_separate`` provider). Read by each forward; its backward follows the forward's choice.
LAUNCHES_ENV = "DAAL_LAUNCHES"
LAUNCH_POLICIES = ("merged", "separate")


def triton_release() -> str:
    """The running Triton's "major.minor" (e.g. "3.6", the GPU image's; "3.8", CI's): the key of
    the facts that differ by release (programs per SM, stack of a build)."""
    return ".".join(triton.__version__.split(".")[:2])


def env_choice(name: str, choices: Tuple[str, ...]) -> str:
    """The environment variable ``name`` (an internal switch), ``choices[0]`` when unset;
    ``ValueError`` naming the variable for a value not in ``choices``."""
    value = os.environ.get(name, choices[0])
    if value not in choices:
        raise ValueError(f"{name} must be one of {choices}, got {value!r}")
    return value


def merged_launches() -> bool:
    """``DAAL_LAUNCHES`` is "merged" (the default); ``ValueError`` for a value not in
    :data:`LAUNCH_POLICIES`."""
    return env_choice(LAUNCHES_ENV, LAUNCH_POLICIES) == "merged"


# ----------------------------------------------------------------------------- eager calls
#: How the operators are called outside ``torch.compile``: ``"function"`` (default), through an
#: ``autograd.Function`` made of the custom operator's own body, setup and backward (:func:`eager`);
#: ``"custom"`` (``DAAL_EAGER_OPS=custom``), through the ``torch.library`` custom operator, as
#: ``torch.compile`` always does. The custom operator's dispatch (its autograd wrapper, the
#: redispatch below autograd, the dynamo guard around the body) costs host time on every call:
#: ~37 µs per call more than an ``autograd.Function`` on a 2-core CPU (``bench/probe_dispatch.py``)
#: and the first H200 run found the B = 180 loss host-bound (docs/kernels.md, "Measured
#: results"). Kept selectable until a GPU run times both (``bench/probe_h200.py``).
EAGER_MODES = ("function", "custom")
EAGER_OPS = os.environ.get("DAAL_EAGER_OPS", "function")


_FAKE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def faking() -> bool:
    """A ``FakeTensorMode`` is active (tensors without values or storage: shape propagation,
    ``torch.export``): only the operators' fake implementations can run. ~0.1 us."""
    return _FAKE_KEY is not None and torch._C._get_dispatch_mode(_FAKE_KEY) is not None


def _operator_call() -> bool:
    """Whether a call goes through the ``torch.library`` operator: under ``torch.compile``, with
    a ``FakeTensorMode`` active (the operator's fake implementation gives the shapes; a launch
    on fake tensors fails) or with ``DAAL_EAGER_OPS=custom`` (checked: another value is a
    ``ValueError``)."""
    if EAGER_OPS not in EAGER_MODES:
        raise ValueError(f"DAAL_EAGER_OPS must be one of {EAGER_MODES}, got {EAGER_OPS!r}")
    return EAGER_OPS != "function" or torch.compiler.is_compiling() or faking()


def _first_order_only(op) -> None:
    """Give the backward operator ``op`` an autograd formula that refuses by name: a second
    derivative (``create_graph=True``, then a backward through the gradient) would otherwise stop
    in PyTorch's "no autograd formula was registered", which does not say what to do."""
    name = op._qualname.split("::")[-1]

    def setup_context(ctx, inputs, output):
        pass

    def backward(ctx, *grads):
        raise NotImplementedError(
            f"daal_triton: the Triton backend's backward ({name}) is not differentiable: second derivatives "
            f"(create_graph=True, then a backward through the gradient) run on the reference backend: "
            f"DAALLoss(..., backend='reference') or daal_triton.daal_loss(..., backend='reference')")

    op.register_autograd(backward, setup_context=setup_context)


_batched_backward = threading.local()


def _legacy_batched_key():
    """The legacy vmap's "Batched" dispatch key (not named in ``torch._C.DispatchKey``): that of
    a batched tensor, its highest; torch.func's "FuncTorchBatched" where this PyTorch lacks it."""
    try:
        return torch._C._dispatch_keys(torch._add_batch_dim(torch.zeros(1), 0, 1)).highestPriorityTypeId()
    except (AttributeError, RuntimeError):
        return torch._C.DispatchKey.FuncTorchBatched


_LEGACY_BATCHED = _legacy_batched_key()


def _batched(t) -> bool:
    """Whether ``t`` is a vmapped tensor: autograd's ``is_grads_batched=True`` (and
    ``jacobian(..., vectorize=True)``) runs a backward on such gradients (the legacy vmap's
    "Batched", torch.func's "FuncTorchBatched"), whose storage no kernel can read. Asked of every
    gradient of every eager backward: two key lookups (~0.5 µs; the key set's text took twice)."""
    if t is None:
        return False
    keys = torch._C._dispatch_keys(t)
    return keys.has(_LEGACY_BATCHED) or keys.has(torch._C.DispatchKey.FuncTorchBatched)


def direct(op):
    """A backward operator (a ``torch.library.custom_op`` without autograd) as the backward
    formulas call it: its body, straight, when the call is eager and gradients are not being
    recorded (an ordinary ``.backward()``); the operator itself otherwise
    (:func:`_operator_call`, a dispatch mode active, or grad mode on: a double backward would differentiate the body's
    own operators). The dispatch costs ~37 µs per call on a 2-core
    CPU (``bench/probe_dispatch.py``): five backward operators per loss call. Every backward
    operator passes through here, so this is also where it gets :func:`_first_order_only`'s
    formula (a named refusal of second derivatives)."""
    _first_order_only(op)
    body = getattr(op, "_init_fn", None)
    if body is None:  # a PyTorch without it: the operator
        return op

    def call(*args):
        # any TorchDispatchMode (fake tensors, make_fx, functionalisation, the launch counter)
        # must see the operator, not its body
        # and a batch of gradients the operator, which vmap's fallback calls once per gradient
        if (torch.is_grad_enabled() or _operator_call() or torch._C._len_torch_dispatch_stack() > 0
                or getattr(_batched_backward, "on", False)):
            return op(*args)
        return body(*args)

    call.__name__ = op._qualname.split("::")[-1] + "_direct"
    return call


def eager(op):
    """``op`` (a ``torch.library.custom_op`` with ``register_autograd``) as the launchers call it:
    the operator itself under ``torch.compile`` (or with ``DAAL_EAGER_OPS=custom``), else an
    ``autograd.Function`` that runs the same body, ``setup_context`` and backward formula (so the
    values, the saved tensors and the gradients are the operator's)."""
    body, setup, backward = (getattr(op, name, None) for name in ("_init_fn", "_setup_context_fn", "_backward_fn"))
    if body is None or setup is None or backward is None:  # a PyTorch without these: the operator
        return op

    class Call(torch.autograd.Function):
        @staticmethod
        def forward(ctx, *args):
            out = body(*args)
            setup(ctx=ctx, inputs=args, output=out)
            return out

        @staticmethod
        def backward(ctx, *grads):
            if not any(map(_batched, grads)):
                return backward(ctx, *grads)
            _batched_backward.on = True  # the backward operators through the dispatcher (direct)
            try:
                return backward(ctx, *grads)
            finally:
                _batched_backward.on = False

    Call.__name__ = Call.__qualname__ = op._qualname.split("::")[-1] + "_eager"

    def call(*args):
        return op(*args) if _operator_call() else Call.apply(*args)

    return call


#: Held by every launch in Triton's interpreter (:func:`serialise_interpreter`); a new one in a
#: forked child (a DataLoader worker forked while another thread launched would wait for ever).
INTERPRETER_LOCK = threading.RLock()


def _new_lock_in_child() -> None:
    global INTERPRETER_LOCK
    INTERPRETER_LOCK = threading.RLock()


os.register_at_fork(after_in_child=_new_lock_in_child)


def interpreter_launch_point() -> Optional[tuple]:
    """``(class, method)`` through which Triton's interpreter launches a kernel, or None for a
    Triton without an interpreter: ``InterpretedFunction.run`` from Triton 3.6 on; Triton 3.5's
    binds ``run`` per instance and launches through ``GridExecutor.__call__``."""
    try:
        from triton.runtime import interpreter
    except ImportError:
        return None
    if hasattr(interpreter.InterpretedFunction, "run"):
        return interpreter.InterpretedFunction, "run"
    return interpreter.GridExecutor, "__call__"


def serialise_interpreter() -> None:
    """Make launches in Triton's interpreter run one at a time, whatever thread makes them.

    The interpreter is not thread-safe: it keeps one process-wide builder whose grid and program
    index each launch sets, and it swaps functions of ``triton.language`` in and out around each
    launch. Two threads launching at once (a loss per thread, a server's requests) then failed with
    "x >= grid_dim[0]", or returned wrong values without an error. Wraps the launch point once
    (idempotent, whoever else wraps it: ``daal_triton.launch_count`` does), when this module is
    imported, so the launchers' direct callers are covered too. Only interpreted launches pass there."""
    point = interpreter_launch_point()
    if point is None:
        return
    cls, name = point
    with INTERPRETER_LOCK:
        original = getattr(cls, name)
        if getattr(original, "_daal_serialised", False):
            return

        @functools.wraps(original)
        def launch(self, *args, _original=original, **kwargs):
            with INTERPRETER_LOCK:  # the module's global, looked up per launch (a child's own)
                return _original(self, *args, **kwargs)

        setattr(launch, "_daal_serialised", True)
        setattr(cls, name, launch)


serialise_interpreter()
