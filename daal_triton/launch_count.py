"""Count the device launches and host synchronisations of a piece of code, on any device.

``with LaunchCount() as n: ...`` records, through a ``TorchDispatchMode``, every aten operator the
code dispatches, *including those inside the package's custom operators* (``daal_triton::*``,
whose bodies a plain dispatch mode does not see), and every Triton kernel launch. On a CPU this
is the path CUDA takes (with the value checks off, as they are for CUDA tensors by default), so
the counts are those a GPU would see, for float32 inputs at sizes one GPU split covers; the tests
assert them (docs/method.md, "Numerics"). Two differences: the line margin's float16/bfloat16
backward widens the GEMM operands on a CPU (two ``aten.to`` per GEMM: CUDA's ``mm`` with
``out_dtype`` has no CPU kernel), and a CPU counts one SM, so the class and column splits a large
problem takes on a GPU are not counted.

* :attr:`LaunchCount.launches`: the operators that launch device work (everything but views,
  metadata and bare allocations) plus the Triton kernels;
* :attr:`LaunchCount.syncs`: the operators that copy a device value to the host.
"""
from __future__ import annotations

import collections
import functools
import threading
from typing import Dict, Optional

import torch
from torch.utils._python_dispatch import TorchDispatchMode, _get_current_dispatch_mode_stack

#: Operators that launch nothing: views and metadata.
VIEWS = frozenset({
    "aten.detach", "aten.expand", "aten.unsqueeze", "aten.select", "aten.squeeze", "aten.view", "aten.t",
    "aten.permute", "aten.slice", "aten.alias", "aten.promote_types", "aten._unsafe_view",
    "aten.lift_fresh", "aten.as_strided", "aten.transpose", "aten.split", "aten.unbind", "aten.reshape",
    "aten.sym_size", "aten.sym_stride", "aten.sym_numel", "aten.sym_storage_offset", "aten.is_same_size",
})
#: Bare allocations (no kernel; the caching allocator hands out memory).
ALLOCATIONS = frozenset({"aten.empty", "aten.empty_like", "aten.empty_strided", "aten.new_empty",
                         "aten.new_empty_strided"})
#: Operators that copy a device value to the host (a synchronisation on CUDA).
SYNCING = frozenset({"aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.item",
                     "aten.equal", "aten.allclose"})
#: Conversions that copy only when they must (seen as such inside a custom operator's body):
#: counted as launches only when the result is new memory.
MAYBE_ALIAS = frozenset({"aten.to", "aten.contiguous", "aten.reshape", "aten.type_as", "aten.flatten"})
CUSTOM_NAMESPACE = "daal_triton."

#: Per thread: how deep this thread is inside a Triton launch (the interpreter runs a kernel in the
#: thread that launches it; the operators it dispatches to do so are not the code's).
_THREAD = threading.local()


def _counter() -> Optional["LaunchCount"]:
    """The counter of the code running in this thread: the innermost :class:`LaunchCount` on its
    dispatch-mode stack (thread-local state, which autograd's device threads inherit), or None.
    Another thread's launches are not charged to it."""
    for mode in reversed(_get_current_dispatch_mode_stack()):
        if isinstance(mode, LaunchCount):
            return mode._root or mode
    return getattr(_THREAD, "dispatching", None)  # an operator the counter runs, off the stack meanwhile


def _launch_points() -> list:
    """The (class, method) pairs every Triton launch passes through: the JIT's ``run`` and the
    interpreter's (:func:`interpreter_launch_point`)."""
    import triton.runtime.jit as jit

    from daal_triton.kernels._common import interpreter_launch_point

    point = interpreter_launch_point()
    return [(jit.JITFunction, "run")] + ([point] if point else [])


def _patch_triton() -> None:
    """Count Triton launches: wrap the launch methods of the JIT and of the interpreter once."""
    for cls, name in _launch_points():
        original = getattr(cls, name)
        if getattr(original, "_daal_counted", False):
            continue

        # wraps: the wrapper keeps the flags of what it wraps (daal_testing's ``daal_strict``), and
        # another patch that wraps it with functools.wraps keeps ``_daal_counted``: neither patch
        # then wraps itself twice, whatever order they come in (a second counter counts twice)
        @functools.wraps(original)
        def run(self, *args, _original=original, **kwargs):
            counter = _counter()
            if counter is None or kwargs.get("warmup", False):
                return _original(self, *args, **kwargs)
            fn = getattr(self, "fn", self)
            counter.triton[getattr(fn, "__name__", "kernel")] += 1
            _THREAD.in_kernel = getattr(_THREAD, "in_kernel", 0) + 1  # what the interpreter dispatches
            try:  # to run it is not the code's
                return _original(self, *args, **kwargs)
            finally:
                _THREAD.in_kernel -= 1

        setattr(run, "_daal_counted", True)
        setattr(cls, name, run)


def _free(name: str) -> bool:
    """Whether operator ``name`` (as counted) launches nothing."""
    return name in VIEWS or name in ALLOCATIONS or name.endswith(" (no copy)")


def _same_storage(out, args) -> bool:
    first = args[0] if args else None
    return (isinstance(out, torch.Tensor) and isinstance(first, torch.Tensor)
            and out.data_ptr() == first.data_ptr() and out.dtype == first.dtype)


def _custom_body(name: str):
    """The Python function behind custom operator ``ns.op`` (``torch.library.custom_op``), or None."""
    try:
        from torch._library.custom_ops import OPDEFS
    except ImportError:  # a PyTorch without it: the operator counts as one opaque call
        return None
    opdef = OPDEFS.get(name.replace(".", "::", 1))
    return getattr(opdef, "_init_fn", None)


class LaunchCount(TorchDispatchMode):
    """A dispatch mode that counts aten operators (inside custom operators too) and Triton launches."""

    def __init__(self, root: Optional["LaunchCount"] = None):
        super().__init__()
        self._root = root
        self.ops: Dict[str, int] = collections.Counter()
        self.custom: Dict[str, int] = collections.Counter()
        self.triton: Dict[str, int] = collections.Counter()

    def __enter__(self):
        if self._root is None:
            _patch_triton()
        return super().__enter__()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        root = self._root or self
        if getattr(_THREAD, "in_kernel", 0):
            return func(*args, **(kwargs or {}))
        name = str(func.overloadpacket)
        body = _custom_body(name) if name.startswith(CUSTOM_NAMESPACE) else None
        if body is not None:
            root.custom[name] += 1
            with LaunchCount(root=root):  # the operator's body: its aten operators count too
                return body(*args, **(kwargs or {}))
        outer, _THREAD.dispatching = getattr(_THREAD, "dispatching", None), root  # an opaque operator's
        try:  # own launches (a custom operator of another namespace) count too
            out = func(*args, **(kwargs or {}))
        finally:
            _THREAD.dispatching = outer
        if name in MAYBE_ALIAS and _same_storage(out, args):
            name += " (no copy)"
        root.ops[name] += 1
        return out

    @property
    def aten_launches(self) -> int:
        return sum(n for name, n in self.ops.items() if not _free(name))

    @property
    def launches(self) -> int:
        """aten operators that launch device work + Triton kernels."""
        return self.aten_launches + sum(self.triton.values())

    @property
    def syncs(self) -> Dict[str, int]:
        return {name: n for name, n in self.ops.items() if name in SYNCING}

    def table(self) -> str:
        """One line per launching operator and kernel, most frequent first."""
        rows = [(n, name) for name, n in self.ops.items() if not _free(name)]
        rows += [(n, f"triton {name}") for name, n in self.triton.items()]
        return "\n".join(f"{n:4d}  {name}" for n, name in sorted(rows, key=lambda r: (-r[0], r[1])))
