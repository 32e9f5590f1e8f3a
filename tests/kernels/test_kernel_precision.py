"""float32 precision (docs/method.md, "Numerics"): the rule that maps
``torch.get_float32_matmul_precision()`` to ``tl.dot``'s input precision, the PTX of the float32
kernels for each setting (read on the CPU: no GPU needed), and close-pair parity of pairwise
distance, kNN and the loss (d in {0, 1e-3, 0.03, 0.1, 0.3}; on a GPU, with the kNN one also under
the interpreter).

Facts the PTX checks rest on (Triton 3.6 / 3.8, sm_80 and sm_90): a ``tl.dot`` of float32 operands
with ``input_precision="tf32"`` issues mma/wgmma on the raw float32 bits (the tensor cores
truncate them: no ``cvt.rna.tf32`` unless the kernel rounds itself); ``"tf32x3"`` rounds its
split with ``cvt.rna.tf32`` and issues three times the MMAs; ``"ieee"`` has no MMA at all.
"""
import re

import pytest
import torch

from daal_testing import DEV, assert_close, compile_many_for_gpu, gpu_job, tolerance

import daal_triton as dt
from daal_triton import reference
from daal_triton.kernels import _common as kc
from daal_triton.kernels import knn as kk
from daal_triton.kernels import line_margin as lm
from daal_triton.kernels import pairwise as kp

GAPS = [0.0, 1e-3, 0.03, 0.1, 0.3]


@pytest.fixture
def matmul_precision():
    """Set ``torch.set_float32_matmul_precision`` for one test and restore it after."""
    before = torch.get_float32_matmul_precision()
    yield torch.set_float32_matmul_precision
    torch.set_float32_matmul_precision(before)


# ----------------------------------------------------------------------------- the rule
def test_rule(matmul_precision):
    assert torch.get_float32_matmul_precision() == "highest"  # PyTorch's default
    for setting, want in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")):
        matmul_precision(setting)
        assert kc.input_precision(torch.float32, gpu=True) == want
        assert kc.dot_flags(torch.float32, gpu=True) == {"INPUT_PRECISION": want,
                                                         "ROUND_TF32": want == "tf32"}
        assert kc.input_precision(torch.float32, gpu=False) == "ieee"  # the interpreter
        for half in (torch.float16, torch.bfloat16):
            assert kc.dot_flags(half, gpu=True) == {"INPUT_PRECISION": "ieee", "ROUND_TF32": False}
    assert kc.round_operands("tf32") and not kc.round_operands("tf32x3")
    assert not kc.round_operands("ieee")
    # the launchers under the interpreter: IEEE whatever the setting
    if kc.interpreting():
        matmul_precision("medium")
        assert kc.dot_flags(torch.float32) == {"INPUT_PRECISION": "ieee", "ROUND_TF32": False}


@pytest.mark.parametrize("capability,tf32", [((7, 0), False), ((7, 5), False), ((8, 0), True), ((8, 6), True),
                                             ((9, 0), True), ((12, 0), True)])
def test_rule_on_a_gpu_without_tf32(matmul_precision, monkeypatch, capability, tf32):
    """A GPU before sm_80 (a V100, a T4) has no TF32: float32 dots are IEEE FMAs there whatever the
    setting (as torch.matmul's), for the kNN, pairwise (its float16 backward too) and line-margin
    launchers, which pass their tensors' device; "tf32" would not build there (``cvt.rna.tf32``)."""
    monkeypatch.setattr(kc, "_CAPABILITY", {0: capability, 1: (9, 0)})
    gpu = torch.device("cuda", 0)
    for setting, want in (("highest", "tf32x3"), ("high", "tf32"), ("medium", "tf32")):
        matmul_precision(setting)
        got = kc.dot_flags(torch.float32, gpu=True, device=gpu)
        assert got == ({"INPUT_PRECISION": want, "ROUND_TF32": want == "tf32"} if tf32
                       else {"INPUT_PRECISION": "ieee", "ROUND_TF32": False}), setting
        assert kc.input_precision(torch.float32, gpu=True, device=torch.device("cuda", 1)) == want  # per device
        assert kp.bwd_flags(torch.float16, gpu=True, device=gpu) == (
            {"INPUT_PRECISION": "tf32", "ROUND_TF32": True} if tf32 else {"INPUT_PRECISION": "ieee", "ROUND_TF32": False})
        assert lm._precision(torch.float32, gpu=True, device=gpu) == ("tf32x3" if tf32 else "ieee")
        for half in (torch.float16, torch.bfloat16):
            assert kc.input_precision(half, gpu=True, device=gpu) == "ieee"
    assert kc.device_capability(torch.device("cpu")) == (0, 0)


def test_line_margin_keeps_float32_accuracy(matmul_precision):
    """The line margin's dots run at float32 accuracy whatever the setting (3xTF32 on a GPU:
    its operands are not rounded to TF32 as a single pass would need; kernels/line_margin.py,
    ``_precision``), and its compiled launches carry that precision; half inputs ``"ieee"``."""
    for setting in ("highest", "high", "medium"):
        matmul_precision(setting)
        assert lm._precision(torch.float32, gpu=True) == "tf32x3", setting
        assert lm._precision(torch.float32, gpu=False) == "ieee"
        for half in (torch.float16, torch.bfloat16):
            assert lm._precision(half, gpu=True) == "ieee"
        for la in lm.launches():
            if "INPUT_PRECISION" in la.flags:
                want = "tf32x3" if la.x_dtype == torch.float32 else "ieee"
                assert la.flags["INPUT_PRECISION"] == want, (setting, la.name)


def test_rule_newer_api(matmul_precision):
    """``torch.backends.cuda.matmul.fp32_precision`` (PyTorch's newer API), where
    ``get_float32_matmul_precision`` may refuse to answer: "tf32" -> single-pass TF32. Mixed with
    the legacy API the newer one is what cuBLAS follows, so the kernels follow it too:
    ``set_float32_matmul_precision("high")`` then ``fp32_precision = "ieee"`` leaves the legacy
    getter answering "high" while cuBLAS runs IEEE (the kernels ran single-pass TF32 until
    2026-12-06)."""
    matmuls = getattr(torch.backends.cuda, "matmul", None)
    if not hasattr(matmuls, "fp32_precision"):
        pytest.skip("this PyTorch has no torch.backends.cuda.matmul.fp32_precision")
    try:
        matmuls.fp32_precision = "tf32"
        assert kc.input_precision(torch.float32, gpu=True) == "tf32"
        matmuls.fp32_precision = "ieee"
        assert kc.input_precision(torch.float32, gpu=True) == "tf32x3"
        matmul_precision("high")
        matmuls.fp32_precision = "ieee"
        assert matmuls.fp32_precision == "ieee" and torch.get_float32_matmul_precision() == "high"
        assert kc.input_precision(torch.float32, gpu=True) == "tf32x3"
        matmul_precision("high")  # the legacy setter last: both APIs say TF32
        assert kc.input_precision(torch.float32, gpu=True) == "tf32"
    finally:
        matmul_precision("highest")  # resets both APIs (the fixture restores the setting after)


def test_launches_list_every_precision():
    """The compile tests build each variant a launcher can pick: both float32 precisions of every
    GEMM entry, one for half inputs."""
    for la in kp.launches() + kk.launches():
        if la.gemm:
            want = ("tf32x3", "tf32") if la.x_dtype == torch.float32 else ("ieee",)
            if la.op == "pairwise" and la.entry.startswith("bwd") and la.x_dtype == torch.float16:
                want = ("tf32",)  # float32 H, single-pass TF32 (kernels/pairwise.py: h_dtype)
            assert la.flags["INPUT_PRECISION"] in want, la.name
    names = {la.name for la in kp.launches() + kk.launches()}
    for base in ("pairwise_fwd-fp32-bd16", "pairwise_bwd_dx-fp32-bd64", "pairwise_bwd_dy-fp32-bd64",
                 "pairwise_sqnorm-fp32-bd64", "pairwise_h-fp32", "knn_fwd_kp16-fp32-bd16",
                 "knn_fwd_kp128-fp32-bd16"):
        assert base in names and base + "-tf32" in names, base


# ----------------------------------------------------------------------------- the PTX
def _mma(ptx: str, cap: int) -> list:
    return re.findall(r"wgmma\.mma_async[^ ;]*" if cap == 90 else r"mma\.sync[^ ;]*", ptx)


@pytest.fixture(scope="module")
def ptx():
    """PTX of the float32 GEMM launches in both variants, and of the bfloat16 pairwise backward."""
    pick = {"pairwise_fwd-fp32-bd16", "pairwise_bwd_dx-fp32-bd64", "pairwise_bwd_dy-fp32-bd64",
            "knn_fwd_kp16-fp32-bd16", "pairwise_sqnorm-fp32-bd64", "pairwise_h-fp32"}
    pick |= {n + "-tf32" for n in pick}
    pick |= {"pairwise_bwd_dx-bf16-bd128", "pairwise_bwd_dy-bf16-bd128"}
    launches = [la for la in kp.launches() + kk.launches() if la.name in pick]
    assert len(launches) == len(pick)
    cases = [(la, cap) for la in launches for cap in (90, 80)
             if cap == 90 or la.name.startswith("pairwise_fwd")]
    res = compile_many_for_gpu([gpu_job(la, capability=cap) for la, cap in cases])
    out = {}
    for (la, cap), r in zip(cases, res):
        assert not r.get("error"), f"{la.name} sm_{cap}:\n{r['error']}"
        out[la.name, cap] = r["ptx"]
    return out


@pytest.mark.build
def test_ptx_float32_precision_paths(ptx):
    """"highest" -> 3xTF32 (rounded split, 3x the MMAs); "high"/"medium" -> one TF32 MMA pass on
    operands rounded with cvt.rna (never truncated), norms of the same rounded values."""
    for base in ("pairwise_fwd-fp32-bd16", "pairwise_bwd_dx-fp32-bd64", "pairwise_bwd_dy-fp32-bd64",
                 "knn_fwd_kp16-fp32-bd16"):
        for cap in (90, 80):
            if (base, cap) not in ptx:
                continue
            x3, one = ptx[base, cap], ptx[base + "-tf32", cap]
            n3, n1 = len(_mma(x3, cap)), len(_mma(one, cap))
            assert n1 > 0 and n3 == 3 * n1, (base, cap, n3, n1)
            assert all("tf32" in m for m in _mma(x3, cap) + _mma(one, cap)), base
            assert "cvt.rna.tf32.f32" in x3, base  # the 3xTF32 split is rounded
            assert "cvt.rna.tf32.f32" in one, base  # the single pass rounds its operands itself
    # the norms (and H) of the single-pass variant are of TF32-rounded values; the default's are not
    for base in ("pairwise_sqnorm-fp32-bd64", "pairwise_h-fp32"):
        assert "cvt.rna.tf32.f32" in ptx[base + "-tf32", 90]
        assert "cvt.rna.tf32.f32" not in ptx[base, 90]


@pytest.mark.build
def test_ptx_bfloat16_backward_uses_bf16_dots(ptx):
    """The pairwise backward of bfloat16 inputs runs bf16 tensor-core dots (H formed once in
    bfloat16), not TF32."""
    for entry in ("bwd_dx", "bwd_dy"):
        mmas = _mma(ptx[f"pairwise_{entry}-bf16-bd128", 90], 90)
        assert mmas and all("bf16" in m for m in mmas), (entry, set(mmas))


# ----------------------------------------------------------------------------- close pairs
def _twins(n, D, gap, dtype, device):
    """``x`` (n unit rows) and ``y = x + gap * (unit direction)`` (n rows), in ``dtype``."""
    x = torch.nn.functional.normalize(torch.randn(n, D, dtype=torch.float64), dim=1)
    u = torch.nn.functional.normalize(torch.randn(n, D, dtype=torch.float64), dim=1)
    return x.to(dtype).to(device), (x + gap * u).to(dtype).to(device)


@pytest.mark.gpu
@pytest.mark.parametrize("gap", GAPS)
@pytest.mark.parametrize("setting", ["highest", "high"])
def test_pairwise_close_pairs_gpu(gap, setting, matmul_precision):
    """GEMM-form distances of close pairs, D = 512: with "highest" the squared distance is within
    float32 accumulation error of the truth (no TF32 bias; the bug was 1.4e-3); with "high" the
    operands are rounded, not truncated: the error is unbiased. Duplicates are within the same
    bounds, not at the clamp: a tensor core's float32 accumulation does not round like the norms'
    FMA sums (in the first H200 run, bench/results/2026-11-30-h200, every duplicate's dot came out
    short: d up to 8.5e-4 with "highest", 2.4e-3 with "high"). The kNN's recompute of its selected
    distances (below) is what gives duplicates the clamp."""
    matmul_precision(setting)
    _pairwise_close(gap, setting, "cuda", 256, 512)


@pytest.mark.parametrize("gap", [0.0, 1e-3, 0.1])
def test_pairwise_close_pairs(gap):
    """The same on this machine (the interpreter's IEEE float32 dots: the "highest" bound)."""
    _pairwise_close(gap, "highest", DEV, 48, 40)


def _pairwise_close(gap, setting, device, n, D):
    x, y = _twins(n, D, gap, torch.float32, device)
    d = kp.pairwise_distance(x, y).diagonal().double()
    ref = reference.pairwise_distance(x.double(), y.double()).diagonal()
    err = d.square() - ref.square().clamp(min=kc.EPS)
    if setting == "highest":
        assert err.abs().max().item() < 1e-5, err.abs().max().item()
    else:
        assert abs(err.mean().item()) < 1e-4, err.mean().item()
    if gap == 0.0:
        assert (d.square() < (1e-5 if setting == "highest" else 1e-4)).all(), d.max().item()
    else:  # the bound can tell: the GEMM form against the true squared distance, gap^2
        assert ref.square().min().item() > 0.5 * gap * gap


def _knn_close(gap, dtype, device, D, n=64, k=1):
    """kNN of each x_i among y (its twin y_i at ``gap``, all others ~sqrt(2) away): the exact
    recompute gives the reference distance to float32 rounding, the clamp for duplicates, and the
    gradient of that same function."""
    x, y = _twins(n, D, gap, dtype, device)
    q = x.detach().requires_grad_(True)
    r = y.detach().requires_grad_(True)
    dist, index = kk.knn(q, r, k)
    qr, rr = x.double().requires_grad_(True), y.double().requires_grad_(True)
    dref, iref = reference.knn(qr, rr, k)
    assert torch.equal(index[:, 0].cpu(), torch.arange(n))
    assert torch.equal(index.cpu(), iref.cpu())
    assert_close(dist, dref, 1e-5, "dist")
    if gap == 0.0:
        assert (dist[:, 0] == kp.CLAMPED_DIST).all()
    g = torch.randn(n, k, device=device)
    (dist * g).sum().backward()
    (dref * g.double()).sum().backward()
    gtol = max(1e-5, tolerance(dtype)) if dtype != torch.float32 else 1e-4
    assert_close(q.grad, qr.grad, gtol, "d query")
    assert_close(r.grad, rr.grad, gtol, "d ref")


@pytest.mark.gpu
@pytest.mark.parametrize("gap", GAPS)
@pytest.mark.parametrize("dtype,setting", [(torch.float32, "highest"), (torch.float32, "high"),
                                           (torch.bfloat16, "highest")])
def test_knn_close_pairs_gpu(gap, dtype, setting, matmul_precision):
    matmul_precision(setting)
    _knn_close(gap, dtype, "cuda", 512, n=300)


@pytest.mark.parametrize("gap", [0.0, 1e-3, 0.1])
def test_knn_close_pairs(gap):
    """The same on this machine (the interpreter on a CPU)."""
    _knn_close(gap, torch.float32, DEV, 40, n=24, k=2)


@pytest.mark.gpu
@pytest.mark.parametrize("gap", GAPS)
def test_loss_close_pairs_gpu(gap):
    """The whole loss with each sample's same-class neighbour at ``gap``: kNN radii, density
    term and gradients match the float64 reference."""
    _loss_close(gap, "cuda", 128, 512, tolerance(torch.float32, tf32=True))


@pytest.mark.parametrize("gap", [0.0, 1e-3, 0.1])
def test_loss_close_pairs(gap):
    """The same on this machine (IEEE float32 dots) at float32's tolerance, except dZ at a 1e-3
    gap: there the float32 rounding of the normalised rows bounds it (docs/method.md, "Numerics":
    ~1e-8 sqrt(D) / separation = 6e-5 at D = 40; measured 2.5e-5)."""
    tol = tolerance(torch.float32, tf32=DEV == "cuda")  # (the GPU variant above is the GPU's test)
    _loss_close(gap, DEV, 64, 40, tol, dz_tol=1e-4 if gap == 1e-3 and DEV != "cuda" else None)


def _loss_close(gap, device, B, D, tol, dz_tol=None):
    C = 8
    x, y2 = _twins(B // 2, D, gap, torch.float32, device)
    z = torch.cat([x, y2])
    labels = torch.arange(B // 2, device=device) % C
    labels = torch.cat([labels, labels])
    seg = torch.nn.functional.normalize(torch.randn(C, 2, D, device=device), dim=-1)
    hp = dict(k=1, tau=0.5, lambda_dens=1.0, lambda_pull=0.1)
    outs = []
    for backend, dtype in (("triton", torch.float32), ("reference", torch.float64)):
        zz = z.to(dtype).requires_grad_(True)
        ss = seg.to(dtype).requires_grad_(True)
        parts = dt.daal_loss(zz, labels, ss, backend=backend, return_parts=True, **hp)
        outs.append((parts.loss, *torch.autograd.grad(parts.loss, (zz, ss)), parts.radius))
    for name, a, b in zip(("loss", "dZ", "dseg", "radius"), *outs):
        assert_close(a, b, dz_tol if name == "dZ" and dz_tol else tol, name)
    assert outs[1][3].max() < 0.5, "every radius is the twin's gap: the density term is active"
