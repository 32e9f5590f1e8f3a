"""Shared test helpers: the one tolerance table of SPEC.md, relative error, random inputs,
and compiling a Triton kernel for a GPU target without a GPU."""
from __future__ import annotations

import torch

# SPEC.md "Parity": ||out - ref|| / ||ref|| against the float64 reference.
TOLERANCE = {
    "float32": 1e-5,  # IEEE fp32 dots (the interpreter)
    "float32_tf32": 5e-3,  # TF32 dots on a GPU
    "float16": 2e-2,
    "bfloat16": 2e-2,
}
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


def tolerance(dtype: torch.dtype, *, tf32: bool = False) -> float:
    name = str(dtype).replace("torch.", "")
    if name == "float32" and tf32:
        return TOLERANCE["float32_tf32"]
    return TOLERANCE[name]


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64; NaN/inf in ``out`` never passes (returns inf)."""
    out = out.detach().double().cpu()
    ref = ref.detach().double().cpu()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    if not torch.isfinite(out).all():
        return float("inf")
    denom = ref.norm().item()
    num = (out - ref).norm().item()
    if denom == 0.0:
        return num
    return num / denom


def assert_close(out: torch.Tensor, ref: torch.Tensor, tol: float, what: str = "") -> None:
    err = rel_err(out, ref)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


def random_problem(B: int, C: int, D: int, *, dtype=torch.float64, device="cpu", classes_present=None):
    """Embeddings B x D, labels in [0, C) (optionally drawn only from ``classes_present``),
    segments C x 2 x D near the unit sphere."""
    z = torch.randn(B, D, dtype=dtype, device=device)
    pool = torch.arange(C) if classes_present is None else torch.as_tensor(classes_present)
    y = pool[torch.randint(0, len(pool), (B,))].to(device)
    mid = torch.nn.functional.normalize(torch.randn(C, D, dtype=torch.float64), dim=1)
    seg = torch.stack([mid + 0.3 * torch.randn(C, D, dtype=torch.float64) / D**0.5,
                       mid + 0.3 * torch.randn(C, D, dtype=torch.float64) / D**0.5], 1)
    return z, y, seg.to(dtype=dtype, device=device)


def compile_for_gpu(fn, signature: dict, constexprs: dict, *, capability: int,
                    num_warps: int = 4, num_stages: int = 2):
    """Compile a ``@triton.jit`` kernel for ``GPUTarget("cuda", capability, 32)`` without a GPU.

    ``signature`` maps every argument name to a Triton type ("*fp32", "i32", ...) or
    "constexpr"; ``constexprs`` gives the constexpr values. Returns the compiled kernel
    (``.asm["ptx"]``, ``.metadata``).
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig = dict(signature)
    for name in constexprs:
        sig[name] = "constexpr"
    src = ASTSource(fn=fn, signature=sig, constexprs=dict(constexprs))
    return triton.compile(src, target=GPUTarget("cuda", capability, 32),
                          options={"num_warps": num_warps, "num_stages": num_stages})
