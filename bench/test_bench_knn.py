"""Benchmarks of the k nearest neighbours (`daal_triton.kernels.knn.knn`; also the chunked `torch.cdist` + `topk` baseline).

Cases (shape x precision x provider x pass) come from ``cases.cases_for("knn", profile)``
through ``bench/conftest.py``; each is timed, its peak extra memory and FLOP/s relative to
``torch.matmul`` recorded. Without CUDA: smoke mode (tiny shapes, Triton's interpreter).
"""
OP = "knn"


def test_bench_knn(case, run_case):
    run_case(case)
