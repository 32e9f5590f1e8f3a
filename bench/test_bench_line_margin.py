"""Benchmarks of the fused adaptive line margin (`daal_triton.kernels.line_margin.line_margin`).

Cases (shape x precision x provider x pass) come from ``cases.cases_for("line_margin", profile)``
through ``bench/conftest.py``; each is timed, its peak extra memory and FLOP/s relative to
``torch.matmul`` recorded. Without CUDA: smoke mode (tiny shapes, Triton's interpreter).
"""
OP = "line_margin"


def test_bench_line_margin(case, run_case):
    run_case(case)
