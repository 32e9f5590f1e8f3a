"""Benchmarks of the whole loss (`DAALLoss`, backend "triton" vs "reference"; `torch.compile(reference.daal_loss)`).

Cases (shape x precision x provider x pass) come from ``cases.cases_for("loss", profile)``
through ``bench/conftest.py``; each is timed, its peak extra memory and FLOP/s relative to
``torch.matmul`` recorded. Without CUDA: smoke mode (tiny shapes, Triton's interpreter).
"""
OP = "loss"


def test_bench_loss(case, run_case):
    run_case(case)
