"""The tensors and the forward of a benchmark case: one setup function per operator, the
provider's function looked up in ``PROVIDER_FUNCTIONS``.

``build_problem(case, device)`` seeds the generator and calls ``SETUPS[case.op]``; every setup
draws its tensors in a fixed order, so a case gets the same inputs in every run. Nothing here
imports triton or ``daal_triton`` at import time: ``TRITON_INTERPRET`` must be settled first
(``bench/conftest.py``).
"""
from __future__ import annotations

import contextlib
import functools
import importlib
import os
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional

import torch
from torch import nn

from cases import SWITCHES, Case, Switch, knn_chunk_rows
from interpreter import tests_on_path

tests_on_path()
from gpu_canary import unvetted  # noqa: E402  (tests/: the canary the GPU tests write)

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
    # more fields for the record, from the seconds of the timed rounds (the training step's)
    metrics: Optional[Callable[[List[float]], dict]] = None


# ----------------------------------------------------------------------------- providers
class ProviderMissing(Exception):
    """A provider cannot run here: a module it needs cannot be imported (``reason`` heads the
    status the case is recorded and skipped with)."""

    reason = "provider not available"


class KernelMissing(ProviderMissing):
    """The Triton kernel module of a provider cannot be imported."""

    reason = "Triton kernel not available"


class PMLMissing(ProviderMissing):
    reason = "pytorch-metric-learning not installed"


class NeedsCUDA(ProviderMissing):
    """A provider that only exists on a GPU (CUDA graphs)."""

    reason = "needs a CUDA GPU"


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
        # In place where no gradient flows (the chunk is cdist's own output): self is one entry
        # per row, not a chunk x N mask, and a label mask needs no second copy of the chunk.
        inplace = not d.requires_grad
        if query_labels is not None:
            mask = query_labels[s:e, None] != ref_labels[None, :]
            d = d.masked_fill_(mask, float("inf")) if inplace else d.masked_fill(mask, float("inf"))
        if exclude_self and s < n:
            r = torch.arange(s, min(e, n), device=query.device)
            if inplace:
                d[r - s, r] = float("inf")
            else:
                d = d.index_put((r - s, r), d.new_full((), float("inf")))
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
    # the kNN's column splits as chosen before the first H200 run (DAAL_KNN_SPLITS=waves)
    "triton_wave_splits": lambda op: import_kernel(op).knn_wave_splits,
}
#: The providers that run an internal switch's alternative (``cases.SWITCHES``: the kNN's checked
#: merge, the line margin's atomic own rows, the loss's aten glue, one launch per kernel) by
#: setting its environment variable around the call: each is read by the forward, and the
#: backward follows the forward's choice. (``DAAL_KNN_SPLITS`` is read once at import: its
#: provider calls ``knn_wave_splits`` above.)
ENV_PROVIDERS = {sw.provider: sw for sw in SWITCHES if sw.env != "DAAL_KNN_SPLITS"}
PROVIDER_FUNCTIONS.update({
    name: (lambda op, sw=sw: functools.partial(_with_env, sw.env, sw.alternative,
                                               getattr(import_kernel(op), FUNCTION_NAMES[op])))
    for name, sw in ENV_PROVIDERS.items()})


#: The providers of the Gluon forwards and their variants (kernels/knn_gluon.py, ``VARIANTS``).
GLUON_PROVIDERS = {"triton_gluon": "gluon", "triton_gluon128": "gluon128"}
#: The providers of the selection by a threshold (kernels/knn_threshold.py): on every tile, and a
#: self-search's filter on half the tiles.
THRESHOLD_PROVIDERS = {"triton_threshold": "threshold", "triton_threshold_half": "half"}
#: The providers of kernels no GPU had run before, and their canary variants: where
#: bench/gpu_check.sh names a canary (tests/gpu_canary.py, ``DAAL_GPU_CANARY``), each is timed only
#: after its variant's GPU tests passed and none failed in the run: a kernel that hangs, faults
#: (the CUDA context lost for every case after it) or mis-selects stays in the test step.
VETTED_PROVIDERS = {**GLUON_PROVIDERS, **THRESHOLD_PROVIDERS}


class NotVetted(ProviderMissing):
    """A provider whose kernel has not passed its parity test in this run."""

    reason = "not vetted on this GPU"


class NotApplicable(ProviderMissing):
    """A switch's alternative that would not run on this case here (the default would, timed
    under the alternative's name)."""

    reason = "does not apply here"


def _prepared(q: torch.Tensor, r: torch.Tensor):
    """The kNN inputs as its forward prepares them (``compute_dtype``, aligned rows)."""
    from daal_triton.kernels import knn as kk

    dtype = kk.compute_dtype("knn", q, r)
    pad = kk.align_rows("knn")
    qp = kk.prepare(q.detach(), dtype, align=pad)
    return qp, (qp if r is q else kk.prepare(r.detach(), dtype, align=pad))


def gluon_applies(variant: str, q: torch.Tensor, r: torch.Tensor, k: int, has_labels: bool) -> Optional[str]:
    """None where ``DAAL_KNN_TILES=variant`` runs the Gluon forward on these kNN inputs, else
    what runs instead (kernels/knn.py, ``forward_entry``: sm_90, the narrow tiles' rows, and
    ``knn_gluon.eligible``)."""
    from daal_triton.kernels import knn as kk

    k = min(k, r.shape[0])  # as kk._knn_forward: at most N neighbours are selected
    if k > kk.MAX_K:
        return f"k = {k} takes the large-k path"
    qp, rp = _prepared(q, r)
    entry = _with_env(kk.TILES_ENV, variant, kk.forward_entry, qp, rp, kk.next_pow2(k), has_labels)
    return None if entry == kk.GLUON_POLICIES[variant] else f"the forward's entry here is {entry}"


def threshold_applies(q: torch.Tensor, r: torch.Tensor, k: int, has_labels: bool, half: bool = False
                      ) -> Optional[str]:
    """None where ``DAAL_KNN_SELECT=threshold`` selects these kNN inputs by a threshold (with
    ``half``: ``DAAL_KNN_SELECT=half``, its filter on half the tiles), else why not
    (kernels/knn_threshold.py, ``eligible`` and ``halves``, on the inputs as the forward prepares
    them)."""
    from daal_triton.kernels import knn_threshold as kt

    k = min(k, r.shape[0])
    qp, rp = _prepared(q, r)
    if not kt.eligible(qp, rp, k, has_labels):
        return f"the threshold selection does not take {str(qp.dtype).replace('torch.', '')}, k = {k}" + (
            ", labels" if has_labels else "") + f", {r.shape[0]} references"
    if half and not kt.halves(qp, rp, k):
        return "the filter on half the tiles takes a self-search whose lists fit at once"
    return None


#: The kNN switches whose alternative may run the default's code on a case (the forward's entry,
#: its epilogue and the rows' width decide): their cases are timed only where it differs.
PLANNED_KNN_SWITCHES = ("DAAL_KNN_TILES", "DAAL_KNN_EPILOGUE", "DAAL_ALIGN_D")


def _knn_plan(q: torch.Tensor, r: torch.Tensor, k: int, has_labels: bool) -> tuple:
    """What the kNN forward runs on these inputs under the current settings: its entry (or the
    large-k path), whether its epilogue is the lean one, and the width of its prepared rows."""
    from daal_triton.kernels import knn as kk

    k = min(k, r.shape[0])
    qp, rp = _prepared(q, r)
    if k > kk.MAX_K:
        return ("the large-k path", False, qp.shape[1])
    entry = kk.forward_entry(qp, rp, kk.next_pow2(k), has_labels)
    return (entry, kk.lean_epilogue(qp.dtype, entry), qp.shape[1])


def knn_switch_applies(sw: Switch, q: torch.Tensor, r: torch.Tensor, k: int, has_labels: bool) -> Optional[str]:
    """None where ``sw``'s alternative runs other kNN code than its default on these inputs, else
    what both run (a case timed under the alternative's name would time the default: the float32
    smoke cases' table, wide, plain and unaligned providers, and on a GPU the table tiles and the
    plain epilogue where the narrow policy takes the table's tiles)."""
    default, alternative = (_with_env(sw.env, v, _knn_plan, q, r, k, has_labels) for v in (sw.default, sw.alternative))
    if default != alternative:
        return None
    entry, lean, width = default
    return (f"{sw.env}={sw.alternative} runs what {sw.default} runs here: the entry {entry}, "
            f"{'lean' if lean else 'plain'} epilogue, rows of {width}")


def operator_function(case: Case) -> Callable:
    """The function ``case.provider`` computes ``case.op`` with (not for the whole loss)."""
    why = case.provider in VETTED_PROVIDERS and unvetted(VETTED_PROVIDERS[case.provider])
    if why:
        raise NotVetted(why)
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
    if case.provider in GLUON_PROVIDERS:  # timed only where it runs, not the default under its name
        why = gluon_applies(GLUON_PROVIDERS[case.provider], q, r, k, "query_labels" in kw)
        if why:
            raise NotApplicable(why)
    if case.provider in THRESHOLD_PROVIDERS:  # likewise
        why = threshold_applies(q, r, k, "query_labels" in kw, half=THRESHOLD_PROVIDERS[case.provider] == "half")
        if why:
            raise NotApplicable(why)
    sw = ENV_PROVIDERS.get(case.provider)
    if sw is not None and sw.env in PLANNED_KNN_SWITCHES and case.provider not in GLUON_PROVIDERS:  # likewise
        why = knn_switch_applies(sw, q, r, k, "query_labels" in kw)
        if why:
            raise NotApplicable(why)
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


def daal_module(provider: str, C: int, D: int) -> nn.Module:
    """``DAALLoss`` with the backend of ``provider`` ("triton"; "eager": "reference"); for
    "triton" the kernels it runs are imported first, so that a missing one is a skip."""
    from daal_triton import DAALLoss

    if provider == "triton":
        for name in ("knn", "line_margin"):
            import_kernel(name)
    return DAALLoss(C, D, backend="triton" if provider == "triton" else "reference")


def setup_loss(case: Case, device: torch.device) -> Problem:
    """The module as users call it (validation included) for triton and eager;
    ``torch.compile`` of the reference function for compile; for triton_graphed the module
    through ``torch.cuda.make_graphed_callables`` (README, "Small batches"; GPU only)."""
    from daal_triton import reference

    d, dtype = case.dims, TORCH_DTYPES[case.dtype]
    B, C, D = d["B"], d["C"], d["D"]
    labels = make_labels(B, C, device)
    emb = torch.randn(B, D, device=device, dtype=dtype).requires_grad_(True)
    if case.provider == "compile":
        seg = _segments(C, D, dtype, device)
        fn = compiled("loss", reference.daal_loss)
        return Problem(lambda: fn(emb, labels, seg), [emb, seg], None, [emb, seg],
                       notes="torch.compile(daal_triton.reference.daal_loss): no input validation")
    if case.provider in ENV_PROVIDERS:  # a switch's alternative (e.g. DAAL_GLUE=aten)
        sw = ENV_PROVIDERS[case.provider]
        module = daal_module("triton", C, D).to(device=device, dtype=dtype)
        return Problem(lambda: _with_env(sw.env, sw.alternative, module, emb, labels), [emb, module.segments],
                       None, [emb, module.segments], notes=f"DAALLoss, {sw.env}={sw.alternative}")
    if case.provider == "triton_graphed":  # README, "Small batches": both passes replay CUDA graphs
        if device.type != "cuda":
            raise NeedsCUDA("torch.cuda.make_graphed_callables captures CUDA graphs")
        module = daal_module("triton", C, D).to(device=device, dtype=dtype)
        torch.cuda.synchronize(device)
        before = torch.cuda.memory_reserved(device)
        graphed = torch.cuda.make_graphed_callables(module, (emb, labels))
        torch.cuda.synchronize(device)
        # the graphs' private pool holds every intermediate from capture on, so a replay allocates
        # next to nothing and the peak columns miss it: the pool's reserve is recorded apart
        pool = torch.cuda.memory_reserved(device) - before
        return Problem(lambda: graphed(emb, labels), [emb, module.segments], None,
                       [emb, module.segments],
                       notes=f"DAALLoss through torch.cuda.make_graphed_callables (fixed shapes); the graphs' "
                             f"pool, {pool / 2**20:.1f} MiB reserved at capture, is not in the peak columns",
                       metrics=lambda times: {"graph_pool_bytes": int(pool)})
    module = daal_module(case.provider, C, D).to(device=device, dtype=dtype)
    return Problem(lambda: module(emb, labels), [emb, module.segments], None,
                   [emb, module.segments], notes="DAALLoss module (validation included)")


def _with_env(name: str, value: str, fn, *args, **kwargs):
    """``fn(*args, **kwargs)`` with environment variable ``name`` set to ``value`` (the autograd
    graph it builds keeps the operators chosen then, so the backward needs no setting)."""
    old = os.environ.get(name)
    os.environ[name] = value
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            del os.environ[name]
        else:
            os.environ[name] = old


# ----------------------------------------------------------------------------- the training step
def embedding_net(dims: dict, device: torch.device) -> nn.Module:
    """The training program's ``EmbeddingNet`` (built on ``device``: no CPU initialisation of
    VGG's 140 M-parameter ImageNet classifier, which it drops), in channels_last; ``dims["width"]``
    is its channel multiplier (``--width``: 1.0 is torchvision's VGG-19, the smoke shape is narrower)."""
    from daal_triton.train.model import EmbeddingNet

    with torch.device(device):
        net = EmbeddingNet(dims["arch"], dims["D"], width=dims.get("width", 1.0))
    return net.to(device=device, memory_format=torch.channels_last)


class CrossEntropyHead(nn.Module):
    """The floor: a linear classifier on the embedding, ``F.cross_entropy`` (a loss cannot cost
    less than this; it is how the network would be trained as a plain classifier)."""

    def __init__(self, num_classes: int, embedding_dim: int):
        super().__init__()
        self.fc = nn.Linear(embedding_dim, num_classes)

    def forward(self, emb: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return nn.functional.cross_entropy(self.fc(emb), labels)


def train_loss(provider: str, C: int, D: int) -> nn.Module:
    """The loss module a training step of ``provider`` trains with."""
    if provider in ("triton", "eager"):
        return daal_module(provider, C, D)
    if provider == "proxyanchor":
        try:
            from pytorch_metric_learning.losses import ProxyAnchorLoss
        except Exception as exc:  # ImportError, or an error inside the package
            raise PMLMissing(f"pytorch_metric_learning cannot be imported ({type(exc).__name__}: {exc}); "
                             "pip install 'daal-triton[pml]'") from exc
        return ProxyAnchorLoss(num_classes=C, embedding_size=D)
    return CrossEntropyHead(C, D)


def train_optimizer(net: nn.Module, loss: nn.Module) -> torch.optim.Optimizer:
    """The training program's optimiser (``engine.make_optimizer``, its default rates: fused AdamW
    on a GPU), so the benchmark's step is the program's step."""
    from daal_triton.train.engine import make_optimizer

    return make_optimizer(net, loss, lr=1e-3, loss_lr=5e-3, weight_decay=1e-4)


class StepClock:
    """Four marks per training step (its start, the loss's start, the loss's end, its end): CUDA
    events on a GPU, read only after the round's synchronisation, so they add no synchronisation
    to the step; ``time.perf_counter`` on the CPU."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.steps: List[list] = []

    def mark(self, marks: list) -> None:
        if self.cuda:
            ev = torch.cuda.Event(enable_timing=True)
            ev.record()
            marks.append(ev)
        else:
            marks.append(time.perf_counter())

    def seconds(self, a, b) -> float:
        return a.elapsed_time(b) / 1e3 if self.cuda else b - a

    def metrics(self, batch: int, times: List[float]) -> dict:
        """Throughput and the loss's share of the step over the timed rounds (the last
        ``len(times)`` steps: the warm-up's come before them)."""
        last = self.steps[-len(times):] if times else []
        step = [self.seconds(m[0], m[3]) for m in last]
        loss = [self.seconds(m[1], m[2]) for m in last]
        med = statistics.median(times) if times else None
        return dict(images_per_s=batch / med if med else None,
                    step_event_s=statistics.median(step) if step else None,
                    loss_s=statistics.median(loss) if loss else None,
                    loss_share=statistics.median(a / b for a, b in zip(loss, step)) if step else None)


# The loss's forward runs under the step's autocast too (a user's `with autocast(): loss =
# criterion(model(x), y)`). The training program (daal_triton/train/engine.py) runs only the
# network under autocast and the loss outside it: False measures that arrangement.
LOSS_UNDER_AUTOCAST = True


def setup_train_step(case: Case, device: torch.device) -> Problem:
    """One optimiser step of the embedding network with the provider's loss on synthetic images
    already on the device: forward (bf16 autocast on a GPU, network in channels_last), loss,
    backward, AdamW step. The loss's forward and backward are marked inside the step: the
    backward runs in two calls, the loss's down to the embedding, then the network's from it
    (the same work as one call)."""
    d = case.dims
    B, C, D, H = d["B"], d["C"], d["D"], d["H"]
    cuda = device.type == "cuda"
    net = embedding_net(d, device)
    loss_fn = train_loss(case.provider, C, D).to(device)
    opt = train_optimizer(net, loss_fn)
    images = torch.randn(B, 3, H, H, device=device).contiguous(memory_format=torch.channels_last)
    labels = make_labels(B, C, device)
    amp = cuda and case.dtype == "bf16"
    clock = StepClock(device)

    def autocast(on: bool = True):
        return torch.autocast("cuda", dtype=torch.bfloat16) if amp and on else contextlib.nullcontext()

    def step() -> torch.Tensor:
        marks: list = []
        bench_flag = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = True  # as a training run would (restored: other cases)
        try:
            opt.zero_grad(set_to_none=True)
            clock.mark(marks)
            with autocast():
                emb = net(images)
            e = emb.detach().requires_grad_(True)
            clock.mark(marks)
            with autocast(LOSS_UNDER_AUTOCAST):
                loss = loss_fn(e, labels)
            loss.backward()
            clock.mark(marks)
            emb.backward(e.grad)
            opt.step()
            clock.mark(marks)
        finally:
            torch.backends.cudnn.benchmark = bench_flag
        clock.steps.append(marks)
        return loss.detach()

    precision = "float32"
    if amp:
        precision = "bf16 autocast" + ("" if LOSS_UNDER_AUTOCAST else " (network only)")
    notes = (f"{d['arch']} embedding net (width {d.get('width', 1.0):g}), {H}x{H} synthetic images, "
             f"{precision}, channels_last, AdamW{', cudnn.benchmark' if cuda else ''}; "
             f"loss: {type(loss_fn).__name__}")
    return Problem(step, [], None, [images], notes=notes,
                   metrics=lambda times: clock.metrics(B, times))


SETUPS: Dict[str, Callable[[Case, torch.device], Problem]] = {
    "pairwise": setup_pairwise,
    "knn": setup_knn,
    "line_margin": setup_line_margin,
    "loss": setup_loss,
    "train_step": setup_train_step,
}


def build_problem(case: Case, device: torch.device) -> Problem:
    torch.manual_seed(0)
    return SETUPS[case.op](case, device)
