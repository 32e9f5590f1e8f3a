"""Test set-up: Triton's interpreter on machines without a GPU, fresh seeds, GPU markers.

``TRITON_INTERPRET=1`` must be set before anything imports triton, so it is set here, at the
top of the first file pytest imports, whenever CUDA is not available.
"""
import os
import sys
import zlib

import torch

if not torch.cuda.is_available():
    assert "triton" not in sys.modules, "triton was imported before TRITON_INTERPRET could be set"
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

HAS_GPU = torch.cuda.is_available()


def pytest_configure(config):
    from daal_triton.backend import interpreter_on

    if interpreter_on():
        from daal_testing import strict_interpreter_launches

        strict_interpreter_launches()  # what the GPU JIT refuses fails here too
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped, with the reason shown, on CPU)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", "shard_weight(w): this test takes about w times an ordinary one "
                            "(its first launches in child processes): DAAL_TEST_SHARD's slices weigh it so")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors through the interpreter "
                            "(skipped, with the reason shown, on a GPU machine, where TRITON_INTERPRET is not set)")
    config.addinivalue_line("markers", "build: builds kernels for GPU targets and reads the result "
                            "(PTX, registers, spills) without running them: no GPU needed "
                            "(bench/gpu_check.sh leaves these to CI unless DAAL_CHECK_BUILD_S reserves time for them)")
    config.addinivalue_line("markers", "small_tiles: runs a kernel at test-only block sizes, so that "
                            "small shapes cross many tiles: one JIT build per case on a GPU "
                            "(bench/gpu_check.sh leaves these to CI, where the interpreter builds nothing)")


#: ``DAAL_TEST_SHARD=i/n``: run only the i-th of n contiguous slices of the selection (after
#: ``-m``/``-k``), of about equal weight; bench/sharded_pytest.py runs the n slices side by side
#: on the GPU machine.
SHARD_ENV = "DAAL_TEST_SHARD"


def shard_of(value: str):
    """``(i, n)`` from ``"i/n"`` (0 <= i < n); ValueError naming the variable otherwise."""
    try:
        i, n = (int(v) for v in value.split("/"))
    except ValueError:
        i, n = -1, 0
    if not 0 <= i < n:
        raise ValueError(f"{SHARD_ENV} must be i/n with 0 <= i < n, got {value!r}")
    return i, n


@pytest.hookimpl(trylast=True)  # after the -m/-k deselection: the slices split what runs
def pytest_collection_modifyitems(config, items):
    if os.environ.get(SHARD_ENV):
        i, n = shard_of(os.environ[SHARD_ENV])
        from daal_testing import item_weight, shard_slice

        keep = [items[j] for j in shard_slice([item_weight(it) for it in items], i, n)]
        kept = set(map(id, keep))
        config.hook.pytest_deselected(items=[it for it in items if id(it) not in kept])
        items[:] = keep
    if HAS_GPU:
        from daal_testing import skip_interpreter_tests_on_gpu

        skip_interpreter_tests_on_gpu(items)
        return
    from daal_testing import KERNELS_RUN, KERNELS_SKIP_REASON

    if not KERNELS_RUN:  # torch 2.4-2.8 (Triton 3.0-3.4): only the reference runs
        skip_kernels = pytest.mark.skip(reason=KERNELS_SKIP_REASON)
        for item in items:  # CPU tensors on the Triton backend, or a case of its parameter "triton"
            params = getattr(getattr(item, "callspec", None), "params", {})
            if "interpreter" in item.keywords or "triton" in params.values():
                item.add_marker(skip_kernels)
    skip = pytest.mark.skip(reason="no CUDA GPU on this machine: GPU parity runs in bench/gpu_check.sh")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed(request):
    """A fresh, reproducible seed per test (derived from its name, so tests differ from each other)."""
    torch.manual_seed(zlib.crc32(request.node.nodeid.encode()))
    yield
