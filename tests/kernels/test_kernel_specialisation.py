"""The launch specialisation the compile tests assume (daal_testing.specialise) is Triton's own.

Triton's JIT turns an integer argument equal to 1 into the constant 1 and marks 16-byte-aligned
pointers and integers divisible by 16 with ``tt.divisibility = 16``; the "aligned" compile jobs
copy that for a contiguous D = 512 launch. If a Triton release changed the rule, the register /
spill reports of the compile tests would describe kernels nobody launches: these tests fail then.
"""
import re

import pytest
import torch

from daal_testing import HOT_PATH, compile_many_for_gpu, gpu_job, specialise, stride_args

from daal_triton.kernels import pairwise as kp


def _triton_specialisation(value):
    """What the JIT's launcher derives from one argument (Triton 3.6 and 3.8 share this API)."""
    from triton._C.libtriton import native_specialize_impl
    from triton.backends.compiler import BaseBackend

    return native_specialize_impl(BaseBackend, value, False, True, True)


def test_rule_matches_triton():
    x = torch.empty(1024, 512)  # the caching allocator aligns storage to >= 256 bytes
    assert _triton_specialisation(1) == ("constexpr", 1)  # a unit stride becomes a constant
    assert _triton_specialisation(x.stride(0))[1] == "D"  # divisible by 16
    assert _triton_specialisation(x)[1] == "D"  # aligned pointer
    assert _triton_specialisation(129)[1] == ""  # odd D: nothing assumed
    assert _triton_specialisation(x[:, 1:])[1] == ""  # a misaligned view


def test_specialise_aligned_and_generic():
    sig = {"x_ptr": "*fp32", "seg_ptr": "*bf16", "D": "i32", "B": "i32", "s_xb": "i32", "s_xd": "i32",
           "s_c": "i32", "s_v": "i32", "s_d": "i32", "BLOCK": "constexpr"}
    out_sig, ones, divisible = specialise("_lm_class_stats_kernel", sig, "aligned")
    assert ones == {"s_d": 1} and "s_d" not in out_sig
    assert divisible == {"x_ptr", "seg_ptr", "D", "s_c", "s_v"}  # B and unlisted strides: nothing
    assert specialise("_lm_class_stats_kernel", sig, "generic") == (sig, {}, set())
    with pytest.raises(ValueError, match="specialisation"):
        specialise("_lm_class_stats_kernel", sig, "fast")


def _all_kernel_signatures():
    from daal_triton.kernels import knn as kk
    from daal_triton.kernels import line_margin as lm

    def fn_name(kernel):  # a JITFunction or, under the interpreter, an InterpretedFunction
        return getattr(kernel, "fn", kernel).__name__

    sigs = {fn_name(c.kernel): c.signature for c in kp.CONFIGS + kk.CONFIGS}
    for name, kernel in lm.KERNELS.items():
        sigs[fn_name(kernel)] = lm.kernel_signature(name, torch.float32)
    return sigs


def test_hot_path_table_classifies_every_stride():
    """Every stride argument of every kernel is classified (unit / rows / other) for the aligned
    builds, so a new kernel or argument cannot silently get a wrong assumption."""
    sigs = _all_kernel_signatures()
    assert set(sigs) == set(HOT_PATH)
    for name, sig in sigs.items():
        hot = HOT_PATH[name]
        listed = [*hot["unit"], *hot["rows"], *hot["other"]]
        assert len(listed) == len(set(listed)), name
        assert set(listed) == stride_args(sig), name


def test_aligned_build_uses_16_byte_async_copies():
    """The attributes reach the compiler: aligned loads become 16-byte cp.async copies (the
    software pipeline); the generic build of the same configuration has none."""
    c = next(c for c in kp.CONFIGS if c.name == "pairwise_fwd-bf16-bd64")
    specs = ("generic", "aligned")
    res = compile_many_for_gpu([gpu_job(c.kernel, c.signature, c.constexprs, capability=90,
                                        num_warps=c.num_warps, num_stages=c.num_stages,
                                        specialisation=s) for s in specs])
    copies = {}
    for spec, r in zip(specs, res):
        assert not r.get("error"), r.get("error")
        copies[spec] = len(re.findall(r"cp\.async\.c[ga]\.shared\.global[^;]*, 0x10", r["ptx"]))
    assert copies["aligned"] > 0 and copies["generic"] == 0, copies
