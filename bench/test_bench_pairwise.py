"""Benchmarks of the pairwise distance (`daal_triton.kernels.pairwise.pairwise_distance`).

Cases (shape x precision x provider x pass) come from ``cases.cases_for("pairwise", profile)``
through ``bench/conftest.py``; each is timed, its peak extra memory and FLOP/s relative to
``torch.matmul`` recorded. Without CUDA: smoke mode (tiny shapes, Triton's interpreter).
"""
OP = "pairwise"


def test_bench_pairwise(case, run_case):
    run_case(case)
