"""The tensors and the forward of a benchmark case: one setup function per operator, the
provider's function looked up in ``PROVIDER_FUNCTIONS``.

``build_problem(case, device)`` seeds the generator and calls ``SETUPS[case.op]``; every setup
draws its tensors in a fixed order, so a case gets the same inputs in every run. Nothing here
imports triton or ``daal_triton`` at import time: ``TRITON_INTERPRET`` must be settled first
(``bench/conftest.py``).
"""
from __future__ import annotations

import importlib
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch

from cases import Case, knn_chunk_rows

TORCH_DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}


@dataclass
class Problem:
    """Inputs and the forward of one case; ``forward()`` returns the tensor the backward starts
    from (a scalar for the loss)."""

    forward: Callable[[], torch.Tensor]
    leaves: List[torch.Tensor]  # tensors whose .grad the backward fills (reset every round)
    grad_out: Optional[torch.Tensor]  # None: a scalar output
    inputs: List[torch.Tensor] = field(default_factory=list)
    no_grad: bool = False  # inference use: forward under torch.no_grad()
    notes: str = ""


# ----------------------------------------------------------------------------- providers
class KernelMissing(Exception):
    """The Triton kernel module of a provider cannot be imported."""


def import_kernel(name: str):
    try:
        return importlib.import_module(f"daal_triton.kernels.{name}")
    except Exception as exc:  # ImportError, or an error inside the module
        raise KernelMissing(f"daal_triton.kernels.{name} cannot be imported: "
                            f"{type(exc).__name__}: {exc}") from exc


def chunked_knn(query: torch.Tensor, ref: torch.Tensor, k: int, *, query_labels=None,
                ref_labels=None, exclude_self: bool = False, chunk_rows: Optional[int] = None):
    """The hand-written baseline: ``torch.cdist`` (matmul form, in the inputs' dtype) on row
    chunks of the query, masked, then ``torch.topk`` (smallest). Never holds more than
    ``chunk_rows x N`` distances. Differentiable w.r.t. ``query`` and ``ref`` (through cdist)."""
    m, n = query.shape[0], ref.shape[0]
    rows = chunk_rows or knn_chunk_rows(n)
    kk = min(k, n)
    dists, idxs = [], []
    for s in range(0, m, rows):
        e = min(m, s + rows)
        d = torch.cdist(query[s:e], ref, compute_mode="use_mm_for_euclid_dist")
        mask = None
        if query_labels is not None:
            mask = query_labels[s:e, None] != ref_labels[None, :]
        if exclude_self and s < n:
            r = torch.arange(s, min(e, n), device=query.device)
            eye = torch.zeros(e - s, n, dtype=torch.bool, device=query.device)
            eye[r - s, r] = True
            mask = eye if mask is None else (mask | eye)
        if mask is not None:
            d = d.masked_fill(mask, float("inf"))
        v, i = torch.topk(d, kk, dim=1, largest=False, sorted=True)
        dists.append(v)
        idxs.append(i)
    return torch.cat(dists), torch.cat(idxs)


def set_compile_limits() -> None:
    """Raise dynamo's recompilation limits: every benchmark shape is a new specialisation, and
    hitting the default limit (8) would silently fall back to eager. Both old and new names."""
    try:
        import torch._dynamo as dynamo
    except Exception:
        return
    for name in ("cache_size_limit", "recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(256, getattr(dynamo.config, name)))
    for name in ("accumulated_cache_size_limit", "accumulated_recompile_limit"):
        if hasattr(dynamo.config, name):
            setattr(dynamo.config, name, max(4096, getattr(dynamo.config, name)))


_COMPILED: Dict[str, Callable] = {}


def compiled(name: str, fn: Callable) -> Callable:
    """One ``torch.compile`` wrapper per reference function for the whole session."""
    if name not in _COMPILED:
        set_compile_limits()
        _COMPILED[name] = torch.compile(fn, dynamic=False)
    return _COMPILED[name]


def _reference(op: str) -> Callable:
    from daal_triton import reference

    return getattr(reference, FUNCTION_NAMES[op])


# The function an operator is, by name, in its kernel module and in ``daal_triton.reference``
# (each kernel module is named after its operator).
FUNCTION_NAMES = {"pairwise": "pairwise_distance", "knn": "knn", "line_margin": "line_margin"}
PROVIDER_FUNCTIONS: Dict[str, Callable[[str], Callable]] = {
    "triton": lambda op: getattr(import_kernel(op), FUNCTION_NAMES[op]),
    "eager": _reference,
    "compile": lambda op: compiled(op, _reference(op)),
    "chunked": lambda op: chunked_knn,
}


def operator_function(case: Case) -> Callable:
    """The function ``case.provider`` computes ``case.op`` with (not for the whole loss)."""
    return PROVIDER_FUNCTIONS[case.provider](case.op)


# ----------------------------------------------------------------------------- inputs
def make_labels(n: int, num_classes: int, device, per_class: int = 4) -> torch.Tensor:
    """Labels as an m-per-class sampler draws them: ``n / per_class`` random classes (at most
    ``num_classes``), ``per_class`` samples each, shuffled."""
    present = max(1, min(num_classes, n // per_class))
    classes = torch.randperm(num_classes, device="cpu")[:present]
    lab = classes[torch.arange(n) % present]
    return lab[torch.randperm(n)].to(device)


def _unit_rows(n: int, d: int, dtype, device) -> torch.Tensor:
    x = torch.randn(n, d, device=device, dtype=torch.float32)
    return torch.nn.functional.normalize(x, dim=1).to(dtype)


def _segments(C: int, D: int, dtype, device) -> torch.Tensor:
    from daal_triton import init_segments

    return init_segments(C, D).to(device=device, dtype=dtype).requires_grad_(True)


# ----------------------------------------------------------------------------- one setup per operator
def setup_pairwise(case: Case, device: torch.device) -> Problem:
    d, dtype = case.dims, TORCH_DTYPES[case.dtype]
    x = _unit_rows(d["M"], d["D"], dtype, device).requires_grad_(True)
    y = _unit_rows(d["N"], d["D"], dtype, device).requires_grad_(True)
    fn = operator_function(case)
    g = torch.randn(d["M"], d["N"], device=device, dtype=torch.float32)
    return Problem(lambda: fn(x, y), [x, y], g, [x, y])


def setup_knn(case: Case, device: torch.device) -> Problem:
    """Same-class search where the shape draws labels; the query is the reference set where
    ``self``; no_grad (retrieval evaluation) where not ``grad``."""
    d, dtype = case.dims, TORCH_DTYPES[case.dtype]
    k = d["k"]
    q = _unit_rows(d["M"], d["D"], dtype, device)
    r = q if d["self"] else _unit_rows(d["N"], d["D"], dtype, device)
    infer = not d.get("grad", True)
    if not infer:
        q.requires_grad_(True)
    kw = dict(exclude_self=bool(d["self"]))
    if d.get("labels"):
        lab = make_labels(d["M"], d["labels"], device)
        kw.update(query_labels=lab, ref_labels=lab if d["self"] else make_labels(d["N"], d["labels"], device))
    fn = operator_function(case)
    g = torch.randn(d["M"], k, device=device, dtype=torch.float32)
    notes = ("chunked: torch.cdist(use_mm) in the input dtype + topk, "
             f"{knn_chunk_rows(d['N'])} rows per chunk" if case.provider == "chunked" else "")
    return Problem(lambda: fn(q, r, k, **kw)[0], [] if infer else [q], g, [q, r], no_grad=infer, notes=notes)


def setup_line_margin(case: Case, device: torch.device) -> Problem:
    d, dtype = case.dims, TORCH_DTYPES[case.dtype]
    B, C, D = d["B"], d["C"], d["D"]
    labels = make_labels(B, C, device)
    x = _unit_rows(B, D, dtype, device).requires_grad_(True)
    seg = _segments(C, D, dtype, device)
    margins = (0.05 + 0.3 * torch.rand(B, device=device)).float()
    kw = dict(alpha=16.0, lambda_pull=0.0)
    fn = operator_function(case)
    g = torch.randn(B, device=device, dtype=torch.float32)
    return Problem(lambda: fn(x, labels, seg, margins, **kw), [x, seg], g, [x, seg, margins])


def setup_loss(case: Case, device: torch.device) -> Problem:
    """The module as users call it (validation included) for triton and eager;
    ``torch.compile`` of the reference function for compile."""
    from daal_triton import DAALLoss, reference

    d, dtype = case.dims, TORCH_DTYPES[case.dtype]
    B, C, D = d["B"], d["C"], d["D"]
    labels = make_labels(B, C, device)
    emb = torch.randn(B, D, device=device, dtype=dtype).requires_grad_(True)
    if case.provider == "compile":
        seg = _segments(C, D, dtype, device)
        fn = compiled("loss", reference.daal_loss)
        return Problem(lambda: fn(emb, labels, seg), [emb, seg], None, [emb, seg],
                       notes="torch.compile(daal_triton.reference.daal_loss): no input validation")
    if case.provider == "triton":
        for name in ("knn", "line_margin"):  # the kernels DAALLoss(backend="triton") runs
            import_kernel(name)
    backend = "triton" if case.provider == "triton" else "reference"
    module = DAALLoss(C, D, backend=backend).to(device=device, dtype=dtype)
    return Problem(lambda: module(emb, labels), [emb, module.segments], None,
                   [emb, module.segments], notes="DAALLoss module (validation included)")


SETUPS: Dict[str, Callable[[Case, torch.device], Problem]] = {
    "pairwise": setup_pairwise,
    "knn": setup_knn,
    "line_margin": setup_line_margin,
    "loss": setup_loss,
}


def build_problem(case: Case, device: torch.device) -> Problem:
    torch.manual_seed(0)
    return SETUPS[case.op](case, device)
