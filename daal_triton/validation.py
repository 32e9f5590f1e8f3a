"""Input validation for the public API: every problem is a ``ValueError`` naming the argument.

Shape, dtype and device checks read no data and always run. The value checks (NaN/inf, label
range) read the data, which on a GPU synchronises the host with it on every call: they always run
on CPU tensors and, on other devices, only when asked (``check_values=True`` or the environment
variable ``DAAL_CHECK_VALUES=1``; docs/method.md, "Bad input"). They are skipped while
``torch.compile`` traces (a data-dependent branch would break the graph). Without them an
out-of-range label cannot reach memory it should not: the loss clamps it and returns NaN for that
sample (``daal_triton.core.compose``).
"""
from __future__ import annotations

import math
import numbers
import os
import sys
from typing import Optional

import torch

CHECK_VALUES_ENV = "DAAL_CHECK_VALUES"


def value_checks_on(device: torch.device, check_values: Optional[bool] = None) -> bool:
    """Whether the value checks run for tensors on ``device``: always on the CPU; elsewhere
    ``check_values``, or when it is None the environment variable ``DAAL_CHECK_VALUES``. Never
    on the meta device (no values to read) nor while ``torch.compile`` traces or a
    ``FakeTensorMode`` is active."""
    check_flag(check_values, "check_values")
    if _is_tracing() or device.type == "meta":
        return False
    if device.type == "cpu":
        on = True
    elif check_values is not None:
        on = bool(check_values)
    else:
        on = os.environ.get(CHECK_VALUES_ENV, "0").strip().lower() in ("1", "true", "yes", "on")
    return on and not _faking()


def _is_tracing() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


_FAKE_KEY = getattr(getattr(torch._C, "_TorchDispatchModeKey", None), "FAKE", None)


def _faking() -> bool:
    """A ``FakeTensorMode`` is active (shape propagation, ``torch.export`` by hand): tensors
    without values, whose reads raise ``DataDependentOutputException`` (as the kernels'
    ``_common.faking``, which this module may not import: it imports triton)."""
    return _FAKE_KEY is not None and torch._C._get_dispatch_mode(_FAKE_KEY) is not None


#: The floating dtypes the loss computes with (float8 has no arithmetic in torch: it would fail
#: deep inside, or be promoted without a rule).
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_float_dtype(dtype, name: str) -> None:
    if dtype not in FLOAT_DTYPES:
        raise ValueError(f"{name} must be float16, bfloat16, float32 or float64, got dtype {dtype}")


def check_dense(t: torch.Tensor, name: str) -> None:
    """``t`` is an ordinary dense tensor: strided, not nested (the kernels and the reference read
    rows by strides; a sparse, mkldnn or nested tensor would fail deep inside torch)."""
    if t.is_nested:
        raise ValueError(f"{name} must be dense (torch.strided), got a nested tensor: pass one tensor "
                         "of rows (torch.cat(t.unbind()))")
    if t.layout != torch.strided:
        raise ValueError(f"{name} must be dense (torch.strided), got layout {t.layout}: convert it with .to_dense()")


def check_float_matrix(t, name: str, *, ndim: int = 2, values: bool = True) -> None:
    """``t`` is a dense float16/bfloat16/float32/float64 tensor of ``ndim`` dimensions (with finite
    values, when ``values``)."""
    if not isinstance(t, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_dense(t, name)
    if t.ndim != ndim:
        raise ValueError(f"{name} must have {ndim} dimensions, got shape {tuple(t.shape)}")
    check_float_dtype(t.dtype, name)
    if values:
        check_finite(t, name)


class NonFiniteError(ValueError):
    """A tensor holds NaN or inf (a ``ValueError``; its own type so a training loop can tell a
    diverged network from a wrong argument)."""


def check_finite(t: torch.Tensor, name: str) -> None:
    """Refuses NaN or inf in ``t``. A NaN or inf anywhere makes the sum NaN or inf, so a finite
    sum settles it in one pass with no tensor-sized temporary (``isfinite(t).all()`` makes four:
    an ``abs`` and three masks); only a sum that overflowed from finite values is checked
    element by element. No autograd record either way."""
    if not t.numel():
        return
    with torch.no_grad():
        if bool(torch.isfinite(t.sum())) or bool(torch.isfinite(t).all()):
            return
    raise NonFiniteError(f"{name} contains NaN or inf")


#: The largest row norm whose squared distances the GEMM form ``||x||^2 + ||y||^2 - 2 x.y`` holds,
#: by compute dtype (float32 for float16/bfloat16/float32 rows): every term and sum stays below
#: ``2^126`` (float32) or ``2^1022`` (float64), so nothing overflows to inf or turns into NaN
DISTANCE_NORM_LIMIT = {torch.float32: 2.0 ** 62, torch.float64: 2.0 ** 510}


def distance_rows(*named: "tuple[str, Optional[torch.Tensor]]", also: torch.dtype = torch.float32
                  ) -> None:
    """:func:`check_distance_range` for each ``(name, rows)`` given (None skipped; a tensor given
    twice, a kNN of a set against itself, checked once), in the dtype they are computed in: the
    promotion of theirs, ``also``'s (the segments') and float32. Finiteness is settled by the same
    reduction: the caller need not read the rows for it first."""
    dtype = also
    for _, t in named:
        dtype = dtype if t is None else torch.promote_types(dtype, t.dtype)
    dtype = torch.promote_types(dtype, torch.float32)
    seen: list = []
    for name, t in named:
        if t is not None and not any(t is s for s in seen):
            seen.append(t)
            check_distance_range(t, name, dtype)


def check_distance_range(t: torch.Tensor, name: str, dtype: torch.dtype) -> None:
    """Refuses a row of ``t`` whose norm passes :data:`DISTANCE_NORM_LIMIT` for the compute
    ``dtype``: its squared distances would overflow (``inf - inf``: NaN, or a row with no
    neighbour), which a finite input must not silently give (a layout probe, 2026-12-07: rows of
    norm 3e19 had NaN distances and no kNN neighbour on both backends). One max-reduction
    settles almost every call: ``max |t_ij| sqrt(D)`` bounds every row's norm, and is NaN or inf
    where :func:`check_finite` would refuse ``t`` (its :class:`NonFiniteError` then): one read of
    the rows for both checks (the kNN's and the distances' callers read them twice: a review,
    2026-12-07; daal-train's evaluation checks the whole test set once per chunk of queries)."""
    limit = DISTANCE_NORM_LIMIT[dtype]
    if not t.numel():
        return
    with torch.no_grad():
        top = float(torch.linalg.vector_norm(t, ord=math.inf))
        if top * math.sqrt(t.shape[1]) <= limit:
            return
        if not math.isfinite(top):
            raise NonFiniteError(f"{name} contains NaN or inf")
        # the rows over ``top`` (norms <= sqrt(D): no overflow) in float32, float64 rows in float64
        # (MPS has no float64: t.double() raised a TypeError there instead of this ValueError)
        scaled = torch.linalg.vector_norm((t.double() if t.dtype == torch.float64 else t.float()) / top, dim=1)
        over = (scaled > limit / top).nonzero()
        if not over.numel():
            return
        i = int(over[0, 0])
    raise ValueError(f"{name}: row {i} has norm {float(scaled[i]) * top:.3g}, above {limit:.3g} (2^{int(math.log2(limit))}): "
                     f"its squared distances overflow {str(dtype)[6:]} (||x||^2 + ||y||^2 - 2 x.y); scale the rows down"
                     + (" or pass float64 rows" if dtype != torch.float64 else ""))


def check_labels(labels, name: str, size: int, num_classes: Optional[int], *, values: bool = True) -> None:
    """``labels`` is a dense integer vector of ``size`` entries (with ``values``: in ``[0, num_classes)``,
    and without ``num_classes`` none a ``uint64`` beyond int64's range: labels are compared as int64,
    where ``2**64 - 1`` would match -1; a bounds probe, 2026-12-07)."""
    if not isinstance(labels, torch.Tensor):
        raise ValueError(f"{name} must be a torch.Tensor, got {type(labels).__name__}")
    check_dense(labels, name)
    if labels.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {tuple(labels.shape)}")
    if labels.dtype.is_floating_point or labels.dtype.is_complex or labels.dtype == torch.bool:
        raise ValueError(f"{name} must be an integer tensor, got dtype {labels.dtype}")
    if labels.shape[0] != size:
        raise ValueError(f"{name} must have {size} entries (one per row), got {labels.shape[0]}")
    if values and labels.numel() and (num_classes is not None or labels.dtype == torch.uint64):
        wide = labels.long()  # torch has no min/max for uint16/32/64; the loss reads labels as int64
        lo, hi = int(wide.min()), int(wide.max())
        if labels.dtype == torch.uint64 and lo < 0:  # wrapped: above int64's range
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values above 2**63 - 1" if num_classes
                             is not None else f"{name} holds values above 2**63 - 1 (labels are compared as int64)")
        if num_classes is not None and (lo < 0 or hi >= num_classes):
            raise ValueError(f"{name} must lie in [0, {num_classes}), got values in [{lo}, {hi}]")


def check_same_device(**tensors: Optional[torch.Tensor]) -> None:
    """The given tensors (None: absent) are tensors on one device."""
    present = {k: v for k, v in tensors.items() if v is not None}
    for name, t in present.items():  # a NumPy array's .device is the string "cpu": not a device mismatch
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    devices = {k: v.device for k, v in present.items()}
    if len(set(devices.values())) > 1:
        desc = ", ".join(f"{k} on {d}" for k, d in devices.items())
        raise ValueError(f"all tensors must be on one device: {desc}")


def check_flag(value: Optional[bool], name: str, *, optional: bool = True) -> Optional[bool]:
    """``value`` as a ``bool`` when it is True or False (Python's or NumPy's), or None when
    ``optional`` (a string such as "False" would read as true)."""
    if optional and value is None:
        return value
    np = sys.modules.get("numpy")  # a NumPy bool (np.True_, as a NumPy comparison gives) is a bool too
    if not (isinstance(value, bool) or (np is not None and isinstance(value, np.bool_))):
        raise ValueError(f"{name} must be {'None, ' if optional else ''}True or False, got {value!r}")
    return bool(value)


def as_int(value, name: str, minimum: int = 1, maximum: Optional[int] = None) -> int:
    """An integer argument (a Python or NumPy integer, not a bool) ``>= minimum`` (and
    ``<= maximum``, when given), as an ``int``."""
    number = int(value) if isinstance(value, numbers.Integral) and not isinstance(value, bool) else None
    if number is None or number < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    if maximum is not None and number > maximum:
        raise ValueError(f"{name} must be an integer in [{minimum}, {maximum}], got {value!r}")
    return number


_FLOAT32_MAX = float(torch.finfo(torch.float32).max)


def as_float(value, name: str) -> float:
    """A real argument (a Python or NumPy number, not a bool) that float32 holds, as a ``float``:
    the kernels and the float32 arithmetic take it as a float32 scalar."""
    if isinstance(value, torch.Tensor):
        raise ValueError(f"{name} must be a Python or NumPy number, not a tensor (its .item()), got {value!r}")
    # ``not abs(value) <= max`` refuses NaN and inf too, and traces (``torch.compile(dynamic=True)``
    # makes a float argument symbolic: ``math.isfinite`` of one cannot be traced); numbers.Real has
    # no ``<=`` for mypy
    if (isinstance(value, bool) or not isinstance(value, numbers.Real)
            or not abs(value) <= _FLOAT32_MAX):  # type: ignore[operator]
        raise ValueError(f"{name} must be a finite number within float32's range, got {value!r}")
    return float(value)


#: The largest ``k``: the kernels index neighbours with 32-bit integers (a larger ``k`` failed deep
#: inside, with a TypeError or a storage-size overflow, not as a bad argument).
K_MAX = 2**31 - 1


def check_k(k) -> int:
    return as_int(k, "k", maximum=K_MAX)


def validate_loss_inputs(
    embeddings, labels, segments, *, k, ref_embeddings=None, ref_labels=None,
    ref_includes_batch=False, check_values: Optional[bool] = None, ref_name: str = "ref_embeddings",
    normalize: bool = True,
) -> None:
    """Everything docs/method.md asks of ``daal_loss``'s tensors (``ref_name``: what the caller
    calls the reference set, ``ref_emb`` for ``DAALLoss``; ``normalize=False``: the rows are used
    as they are, so their norms must keep the GEMM form's squares finite)."""
    check_flag(ref_includes_batch, "ref_includes_batch", optional=False)
    for name, t in (("embeddings", embeddings), ("labels", labels), ("segments", segments)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_same_device(embeddings=embeddings, labels=labels, segments=segments,
                      **{ref_name: ref_embeddings}, ref_labels=ref_labels)
    values = value_checks_on(embeddings.device, check_values)
    check_float_matrix(embeddings, "embeddings", values=values)
    if embeddings.shape[0] < 1:
        raise ValueError("embeddings must have at least one row")
    if embeddings.shape[1] < 1:
        raise ValueError("embeddings must have at least one column (D >= 1)")
    check_float_matrix(segments, "segments", ndim=3, values=values)
    num_classes, two, dim = segments.shape
    if two != 2 or num_classes < 1:
        raise ValueError(f"segments must have shape (C, 2, D) with C >= 1, got {tuple(segments.shape)}")
    if dim != embeddings.shape[1]:
        raise ValueError(
            f"segments has dimension {dim} but embeddings has {embeddings.shape[1]} (shape C x 2 x D)"
        )
    check_k(k)
    check_labels(labels, "labels", embeddings.shape[0], num_classes, values=values)
    if (ref_embeddings is None) != (ref_labels is None):
        raise ValueError(f"{ref_name} and ref_labels must be given together")
    if ref_embeddings is not None:
        check_float_matrix(ref_embeddings, ref_name, values=values)
        if ref_embeddings.shape[1] != embeddings.shape[1]:
            raise ValueError(
                f"{ref_name} must have {embeddings.shape[1]} columns like embeddings, "
                f"got {ref_embeddings.shape[1]}"
            )
        # free values (a row whose label is no sample's is never a neighbour): nothing read
        check_labels(ref_labels, "ref_labels", ref_embeddings.shape[0], None, values=False)
        if ref_includes_batch and ref_embeddings.shape[0] < embeddings.shape[0]:
            raise ValueError(f"ref_includes_batch=True needs {ref_name} to start with the batch's "
                             f"{embeddings.shape[0]} rows, got {ref_embeddings.shape[0]} rows")
    elif ref_includes_batch:
        raise ValueError(f"ref_includes_batch=True needs {ref_name} and ref_labels")
    if values and not normalize:  # normalised rows have norm 1
        distance_rows(("embeddings", embeddings), (ref_name, ref_embeddings), also=segments.dtype)


def validate_knn_inputs(query, ref, k, query_labels=None, ref_labels=None, *,
                        check_values: Optional[bool] = None) -> None:
    for name, t in (("query", query), ("ref", ref)):
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    check_same_device(query=query, ref=ref, query_labels=query_labels, ref_labels=ref_labels)
    values = value_checks_on(query.device, check_values)
    check_float_matrix(query, "query", values=False)
    check_float_matrix(ref, "ref", values=False)
    if values:  # finite, and within the GEMM form's range: one read of each
        distance_rows(("query", query), ("ref", ref))
    if query.shape[1] != ref.shape[1]:
        raise ValueError(f"query and ref must have the same number of columns, got {query.shape[1]} and {ref.shape[1]}")
    check_k(k)
    if (query_labels is None) != (ref_labels is None):
        raise ValueError("query_labels and ref_labels must be given together")
    if query_labels is not None:
        check_labels(query_labels, "query_labels", query.shape[0], None, values=values)
        check_labels(ref_labels, "ref_labels", ref.shape[0], None, values=values)
