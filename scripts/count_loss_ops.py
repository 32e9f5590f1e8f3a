"""Count what one DAALLoss forward+backward dispatches (issue 13: host syncs and launches).

    TRITON_INTERPRET=1 .venv/bin/python scripts/count_loss_ops.py [triton|reference] [B C D]

Runs on the CPU the path CUDA takes (value checks off) and prints the number of aten operators
that launch work (views and metadata left out) in the forward and in all, the host
synchronisations (``_local_scalar_dense`` and friends) and the most frequent operators. The Triton
kernels themselves run inside the ``daal_triton::*`` custom operators, counted once each.
"""
import collections
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

import daal_triton  # noqa: E402
from daal_triton import validation  # noqa: E402

VIEWS = {"aten.detach", "aten.expand", "aten.unsqueeze", "aten.select", "aten.squeeze", "aten.view", "aten.t",
         "aten.permute", "aten.slice", "aten.alias", "aten.promote_types", "aten._unsafe_view",
         "aten.lift_fresh", "aten.as_strided"}
SYNCS = {"aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.item"}


class Count(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.ops[str(func.overloadpacket)] += 1
        return func(*args, **(kwargs or {}))

    def launches(self) -> int:
        return sum(n for name, n in self.ops.items() if name not in VIEWS)


def main() -> None:
    backend = sys.argv[1] if len(sys.argv) > 1 else "triton"
    B, C, D = (int(v) for v in sys.argv[2:5]) if len(sys.argv) > 4 else (180, 100, 64)
    validation.value_checks_on = lambda device, check_values=None: False  # as on a CUDA tensor
    loss = daal_triton.DAALLoss(C, D, backend=backend)
    z = torch.randn(B, D, requires_grad=True)
    y = torch.arange(B) % max(1, C // 2)
    loss(z, y).backward()  # imports and one-time set-up
    with Count() as fwd:
        out = loss(z, y)
    with Count() as bwd:
        out.backward()
    syncs = {k: v for k, v in (fwd.ops + bwd.ops).items() if k in SYNCS}
    print(f"{backend} B={B} C={C} D={D}: forward {fwd.launches()} launching ops, backward {bwd.launches()}, "
          f"total {fwd.launches() + bwd.launches()}; host syncs {syncs or 0}")
    print("most frequent:", (fwd.ops + bwd.ops).most_common(12))


if __name__ == "__main__":
    main()
