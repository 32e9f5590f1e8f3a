"""The launch specialisation the compile tests assume (daal_testing.specialise) is Triton's own.

Triton's JIT turns an integer argument equal to 1 into the constant 1 and marks 16-byte-aligned
pointers and integers divisible by 16 with ``tt.divisibility = 16``; the "aligned" compile jobs
copy that for a contiguous D = 512 launch. If a Triton release changed the rule, the register /
spill reports of the compile tests would describe kernels nobody launches: these tests fail then.
"""
import inspect
import os
import re

import pytest
import torch
import triton
import triton.language as tl
from triton.language.target_info import cuda_capability_geq

from daal_testing import compile_many_for_gpu, compiler_fact, gpu_job, specialise
from daal_testing import triton_specialisation as _triton_specialisation

from daal_triton.kernels import line_margin as lm
from daal_triton.kernels import pairwise as kp
from daal_triton.kernels._common import every_launch, every_spec


def test_rule_matches_triton():
    x = torch.empty(1024, 512)  # the caching allocator aligns storage to >= 256 bytes
    assert _triton_specialisation(1) == ("constexpr", 1)  # a unit stride becomes a constant
    assert _triton_specialisation(x.stride(0))[1] == "D"  # divisible by 16
    assert _triton_specialisation(x)[1] == "D"  # aligned pointer
    assert _triton_specialisation(129)[1] == ""  # odd D: nothing assumed
    assert _triton_specialisation(x[:, 1:])[1] == ""  # a misaligned view


def test_descriptor_type_is_tritons():
    """A descriptor argument's type in the compile tests (``_common.descriptor_type``) is what
    Triton's launcher derives from the ``TensorDescriptor`` the kNN forward passes."""
    from triton.tools.tensor_descriptor import TensorDescriptor

    from daal_triton.kernels._common import descriptor_type

    x = torch.empty(300, 512, dtype=torch.bfloat16)
    for rows, bd in ((128, 64), (64, 64)):
        d = TensorDescriptor(x, [300, 512], [512, 1], [rows, bd])
        assert _triton_specialisation(d)[0] == descriptor_type(torch.bfloat16, rows, bd)


def test_specialise_aligned_and_generic():
    spec = lm.KERNELS["prep2"]
    sig = dict(spec.signature_for(torch.float32, torch.bfloat16), BLOCK_C="constexpr")
    out_sig, ones, divisible = specialise(sig, spec.unit, spec.rows, "aligned")
    assert ones == {"stride_seg_d": 1} and "stride_seg_d" not in out_sig
    # pointers, D and the row strides; C and unlisted strides: nothing
    assert divisible == {"seg_ptr", "sx_ptr", "st_ptr", "D", "stride_seg_c", "stride_seg_v"}
    assert specialise(sig, spec.unit, spec.rows, "generic") == (sig, {}, set())
    with pytest.raises(ValueError, match="specialisation"):
        specialise(sig, spec.unit, spec.rows, "fast")


@pytest.mark.parametrize("spec", every_spec(), ids=lambda s: s.name)
def test_every_stride_is_classified(spec):
    """Every stride argument of every kernel is classified (unit / rows / other) for the aligned
    builds, so a new kernel or argument cannot silently get a wrong assumption; and the declared
    signature lists exactly the kernel's runtime arguments, in order."""
    fn = getattr(spec.kernel, "fn", spec.kernel)
    params = inspect.signature(fn).parameters.values()
    assert list(spec.signature) == [p.name for p in params if "constexpr" not in str(p.annotation)]
    listed = [*spec.unit, *spec.rows, *spec.other]
    assert len(listed) == len(set(listed))
    assert set(listed) == spec.stride_args()
    assert all(n.startswith("stride_") for n in listed)


def test_every_kernel_is_launched():
    """Every kernel of every op has a configuration the compile tests build."""
    assert {la.spec.name for la in every_launch()} == {s.name for s in every_spec()}


@pytest.mark.build
def test_aligned_build_uses_16_byte_async_copies():
    """The attributes reach the compiler: aligned loads become 16-byte cp.async copies (the
    software pipeline); the generic build of the same configuration has none."""
    la = next(la for la in kp.launches() if la.name == "pairwise_fwd-bf16-bd64")
    specs = ("generic", "aligned")
    res = compile_many_for_gpu([gpu_job(la, capability=90, specialisation=s) for s in specs])
    copies = {}
    for spec, r in zip(specs, res):
        assert not r.get("error"), r.get("error")
        copies[spec] = len(re.findall(r"cp\.async\.c[ga]\.shared\.global[^;]*, 0x10", r["ptx"]))
    assert copies["aligned"] > 0 and copies["generic"] == 0, copies


@pytest.mark.build
def test_compile_workers_run_at_once():
    """``compile_many_for_gpu`` runs its workers side by side (CI's compile tests take half the
    time on 2 cores): each worker had read its jobs before the other was done. Feeding one
    worker's pipe after the other's had finished made them take turns."""
    launches = [la for la in kp.launches() if la.name.startswith("pairwise_fwd")][:2]
    assert len(launches) == 2
    res = compile_many_for_gpu([gpu_job(la, capability=90) for la in launches], workers=2)
    assert not [r["error"] for r in res if r.get("error")]
    spans = [r["worker"] for r in res]
    assert spans[0]["pid"] != spans[1]["pid"]
    assert max(s["started"] for s in spans) < min(s["done"] for s in spans), spans


@triton.jit
def _target_probe_kernel(out_ptr):
    if cuda_capability_geq(10):
        tl.store(out_ptr, 71717)
    else:
        tl.store(out_ptr, 90909)


@pytest.mark.build
def test_a_kernel_sees_the_target_it_is_compiled_for(monkeypatch, tmp_path):
    """``cuda_capability_geq`` (Triton's, used by the kNN forward for Blackwell) reads the target
    the compile tests build for, as it reads the active GPU's at launch: an sm_100 build takes the
    Blackwell branch, sm_90 and sm_80 builds the other. Without that the sm_100 builds would be
    of the branch no B200 runs."""
    jobs = [{"module": __name__.rpartition(".")[2], "name": "_target_probe_kernel",
             "signature": {"out_ptr": "*i32"}, "constexprs": {}, "capability": cap, "num_warps": 1,
             "num_stages": 1, "specialisation": "recorded", "divisible": [], "unit": [], "rows": [],
             "sass": False, "path": os.path.dirname(os.path.abspath(__file__))} for cap in (100, 90, 80)]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path))  # built here, not read from the cache
    branch = []
    for res in compile_many_for_gpu(jobs, workers=1):
        assert not res.get("error"), res.get("error")
        branch.append(("71717" in res["ptx"], "90909" in res["ptx"]))
    assert branch == [(True, False), (False, True), (False, True)], branch


@pytest.mark.build
def test_a_build_has_one_cache_key_in_every_process(monkeypatch):
    """The same compile job gets the same Triton cache key in processes with different string-hash
    seeds, so a build compiled once is read from Triton's cache by every later test of the run
    (the ``tt.divisibility`` attributes were listed in a set's order: each worker compiled again)."""
    launch = next(la for la in kp.launches() if la.name.startswith("pairwise_fwd"))
    job = gpu_job(launch, capability=90, specialisation="aligned")
    keys = []
    for seed in ("1", "2", "3"):
        monkeypatch.setenv("PYTHONHASHSEED", seed)
        (res,) = compile_many_for_gpu([job], workers=1)
        assert not res.get("error"), res.get("error")
        keys.append(res["hash"])
    assert len(set(keys)) == 1, keys



def test_a_launch_keyword_the_kernel_lacks_fails_here_as_on_a_gpu():
    """The GPU JIT refuses a launch keyword that is neither a parameter nor a compile option; the
    interpreter would drop it silently (tests/conftest.py installs
    ``daal_testing.strict_interpreter_launches`` so that the CPU suite fails as a GPU would)."""
    import triton
    import triton.language as tl

    @triton.jit
    def _copy(x_ptr, y_ptr, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        tl.store(y_ptr + offs, tl.load(x_ptr + offs))

    dev = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.arange(16.0, device=dev)
    y = torch.empty_like(x)
    _copy[(1,)](x, y, BLOCK=16, num_warps=1)  # a parameter and a compile option: fine
    assert torch.equal(y, x)
    with pytest.raises((TypeError, KeyError), match="FLAT"):
        _copy[(1,)](x, y, BLOCK=16, FLAT=False)


#: The size and stride arguments that the benchmarks' big shapes (M = N = 60,000, B = 1,024 or
#: 4,096, C = 100,000 or 1,000,000, N = 65,536, D = 512: all multiples of 16) turn into
#: ``tt.divisibility = 16`` at launch, on top of the "aligned" specialisation (which keeps sizes
#: unspecialised): per operator, the names its kernels may have.
_SIZED = {
    "knn": ["M", "N", "cols_per_split", "stride_top_s", "stride_top_m", "stride_dist_m", "stride_index_m",
            "stride_g_m", "stride_idx_m"],
    "line_margin": ["B", "C", "Cc", "c0", "n", "R", "Rf", "nsplit", "row_programs", "class_programs"],
    "pairwise": ["M", "N", "R", "C", "stride_out_m", "stride_h_m", "stride_g_m", "stride_dist_m",
                 "stride_hrow_s", "stride_hcol_s"],
}
#: Where the benchmarks' time goes: these must keep every value in registers.
_HOT = ("knn_fwd", "line_margin_fwd2", "line_margin_bwd2", "pairwise_fwd")


@pytest.mark.build
def test_benchmark_shapes_specialisations_compile_without_spills():
    """The bf16 sm_90 builds the benchmarks' big shapes launch (sizes divisible by 16, which the
    aligned builds of the other tests leave generic): they compile, the hot kernels without any
    stack, the others with at most 16 bytes (measured 2026-12-02: 0 B, and 8 B in
    line_margin_ownseg2; the bf16 line_margin fwd2 rose from 197 to 254 registers under Triton 3.6)."""
    import dataclasses

    from daal_triton.kernels import knn as kk

    launches = [la for la in kk.launches() if la.x_dtype == torch.bfloat16 and la.block_d in (64, None)
                and (la.entry in ("fwd_wide", "finish_kp16", "bwd")
                     or (la.entry == "fwd_kp16" and la.flags["COUNTED"] and not la.flags["FINISH"]))]
    launches = [dataclasses.replace(la, flags=dict(la.flags, KP=8, HAS_LABELS=False))
                if la.entry == "fwd_kp16" else la for la in launches]
    launches += [la for mod in (lm, kp) for la in mod.launches()
                 if la.x_dtype == torch.bfloat16 and la.block_d in (64, 128, None)]
    assert {la.name.split("-")[0] for la in launches} >= {"knn_fwd_kp16", "knn_fwd_wide", "line_margin_fwd2",
                                                            "line_margin_bwd2", "pairwise_fwd"}
    jobs = []
    for la in launches:
        job = gpu_job(la, capability=90, specialisation="aligned")
        op = next(op for op in _SIZED if la.name.startswith(op + "_"))
        job["rows"] = job["rows"] + [n for n in _SIZED[op] if n in la.signature and n not in job["rows"]]
        jobs.append(job)
    results = compile_many_for_gpu(jobs)
    for la, res in zip(launches, results):
        assert not res.get("error"), f"{la.name}:\n{res.get('error')}"
    over = [(la.name, res.get("registers"), res.get("stack")) for la, res in zip(launches, results)
            if res.get("stack", 0) > (0 if la.name.startswith(_HOT) else 16)]
    compiler_fact(not over, f"stack over its limit (name, registers, bytes): {over}")  # Triton 3.9: knn_fwd_wide bf16
