"""Count what one DAALLoss forward+backward launches (issue 13: launches and host syncs).

    TRITON_INTERPRET=1 .venv/bin/python scripts/count_loss_ops.py [triton|reference] [B C D]

Runs on the CPU the path CUDA takes (value checks off) and prints the device launches of the
forward and the backward (aten operators that launch work, inside the package's custom operators
too, plus Triton kernels; views and bare allocations left out: ``daal_triton.launch_count``), the
host synchronisations, and the launches by operator.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402

import daal_triton  # noqa: E402
from daal_triton import validation  # noqa: E402
from daal_triton.launch_count import LaunchCount  # noqa: E402


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "triton"
    B, C, D = (int(v) for v in sys.argv[2:5]) if len(sys.argv) > 4 else (180, 100, 64)
    validation.value_checks_on = lambda device, check_values=None: False  # as on a CUDA tensor
    loss = daal_triton.DAALLoss(C, D, backend=backend)
    z = torch.randn(B, D, requires_grad=True)
    y = torch.arange(B) % max(1, C // 2)
    loss(z, y).backward()  # imports and one-time set-up
    with LaunchCount() as fwd:
        out = loss(z, y)
    with LaunchCount() as bwd:
        out.backward()
    print(f"{backend} B={B} C={C} D={D}: forward {fwd.launches} launches, backward {bwd.launches}, "
          f"total {fwd.launches + bwd.launches}; host syncs {dict(fwd.syncs, **bwd.syncs) or 0}")
    print("forward:\n" + fwd.table())
    print("backward:\n" + bwd.table())


if __name__ == "__main__":
    main()
