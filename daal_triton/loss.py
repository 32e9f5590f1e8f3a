"""``DAALLoss``: the nn.Module users put in their training loop."""
from __future__ import annotations

from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from .backend import BACKENDS, TORCHSCRIPT_REFUSAL
from .core import Hyperparameters, _no_autocast
from .functional import inputs_dtype, loss_with
from .validation import _is_tracing, as_float, as_int, check_dense, check_flag, check_float_matrix, value_checks_on


def init_segments(num_classes: int, embedding_dim: int, *, length: float = 0.2,
                  generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """Segments for normalised embeddings (C x 2 x D): class ``c`` gets a random unit midpoint
    ``o_c`` on the sphere and a random unit direction ``v_c`` orthogonal to it, and
    ``p_c = o_c - (length/2) v_c``, ``q_c = o_c + (length/2) v_c``. Random midpoints on the
    sphere are nearly orthogonal in high dimension, so classes start well apart; the short
    segment (``length`` < ``l_max``) leaves room to grow along the class's main mode of variation.
    With ``embedding_dim = 1`` no direction is orthogonal to the midpoint: the segments have length
    0 (``p = q = o``) whatever ``length`` is. Drawn in float64, returned in the default dtype
    (``torch.get_default_dtype()``, as ``nn.Linear``'s weights). ``num_classes`` and
    ``embedding_dim`` are integers >= 1, ``length`` a finite number >= 0 (a ``ValueError`` names
    the argument otherwise).
    """
    num_classes = as_int(num_classes, "num_classes")
    embedding_dim = as_int(embedding_dim, "embedding_dim")
    length = as_float(length, "length")
    if length < 0:
        raise ValueError(f"length must be >= 0, got {length!r}")
    if generator is not None and not isinstance(generator, torch.Generator):
        raise ValueError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")
    o = torch.randn(num_classes, embedding_dim, generator=generator, dtype=torch.float64)
    o = o / o.norm(dim=1, keepdim=True).clamp_min(1e-12)
    v = torch.randn(num_classes, embedding_dim, generator=generator, dtype=torch.float64)
    v = v - (v * o).sum(1, keepdim=True) * o  # orthogonal to the midpoint (zero when D = 1)
    v = v / v.norm(dim=1, keepdim=True).clamp_min(1e-12)
    half = 0.5 * length * v
    return torch.stack([o - half, o + half], 1).to(torch.get_default_dtype())


def _hyperparameter(name: str) -> property:
    """``DAALLoss.<name>``: ``hp.<name>``; setting it replaces ``hp`` by a copy with the new value,
    checked by :class:`Hyperparameters` (a ``ValueError`` naming it; ``hp`` unchanged then)."""

    def get(self: DAALLoss) -> Any:
        return getattr(self.hp, name)

    def set_(self: DAALLoss, value: Any) -> None:
        self.hp = self.hp.replace(**{name: value})

    return property(get, set_, doc=f"The hyperparameter ``{name}`` (``hp.{name}``): settable, checked.")


#: What the segments' shape fixes when the loss is built: read-only attributes.
_FIXED = ("num_classes", "embedding_dim", "point_proxies")


def _fixed(name: str) -> property:
    """``DAALLoss.<name>``, read-only: assigning one is an AttributeError saying so (a
    ``num_classes`` assigned did nothing, a ``point_proxies`` assigned failed at the next call with
    "segments must have shape (C, 2, D) ..., got (11, 4, 16)": noticed 2026-12-07)."""

    def get(self: DAALLoss) -> Any:
        try:
            return self.__dict__["_" + name]
        except KeyError:  # an unbuilt module (DAALLoss.__new__)
            raise AttributeError(f"'DAALLoss' object has no attribute {name!r} (the module was not initialised)") \
                from None

    def set_(self: DAALLoss, value: Any) -> None:
        segments = self.__dict__.get("_parameters", {}).get("segments")  # none before DAALLoss.__init__
        shape = "" if segments is None else f" (the segments are {tuple(segments.shape)})"
        raise AttributeError(f"DAALLoss.{name} is fixed when the loss is built{shape}; build a new "
                             f"DAALLoss({name}=...) instead")

    return property(get, set_, doc=f"``{name}``, given to the constructor: read-only.")


def miner_weights(indices_tuple: Sequence[torch.Tensor], batch_size: int, *,
                  device: Optional[torch.device] = None, using_ref: bool = False,
                  dtype: torch.dtype = torch.float32, check_values: Optional[bool] = None) -> torch.Tensor:
    """Per-sample weights from a miner's tuples, as pytorch-metric-learning's proxy losses use
    them (``lmu.convert_to_weights``): ``count_i / max_j count_j``, where ``count_i`` is how often
    sample ``i`` appears in any of the tuple's index tensors; all ones when the tuple is empty.
    ``using_ref`` (the tuple was mined against a reference set, ``miner(emb, labels, ref_emb,
    ref_labels)``): only the anchors index the batch (``a`` of a triplet, ``a1`` and ``a2`` of
    pairs); the positives and negatives index the reference set and are not counted. The weights
    are in ``dtype`` (the loss's); the index range is checked when the value checks run
    (``check_values``, see ``daal_triton.daal_loss``); without them an index outside the batch
    counts for no sample."""
    if not isinstance(indices_tuple, (tuple, list)) or not 2 <= len(indices_tuple) <= 4:
        raise ValueError("indices_tuple must be a miner's tuple of 2 to 4 index tensors (pairs or "
                         f"triplets), got {type(indices_tuple).__name__}")
    if using_ref and len(indices_tuple) == 2:
        raise ValueError("indices_tuple with ref_emb must be a miner's triplets (a, p, n) or pairs "
                         "(a1, p, a2, n): its anchors say which batch rows count")
    for t in indices_tuple:
        if isinstance(t, torch.Tensor):
            check_dense(t, "indices_tuple's tensors")
        if not isinstance(t, torch.Tensor) or t.ndim != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise ValueError("indices_tuple must hold 1-D integer tensors of batch indices")
        if t.device.type == "meta" and device is not None and torch.device(device).type != "meta":
            raise ValueError("indices_tuple must hold real tensors (a meta tensor has no values), got one "
                             f"on the meta device with embeddings on {device}")
    if using_ref:  # the anchors: a (triplets) or a1, a2 (pairs)
        indices_tuple = indices_tuple[:1] if len(indices_tuple) == 3 else indices_tuple[::2]
    flat = torch.cat([t.to(device=device, dtype=torch.long) for t in indices_tuple])
    if flat.numel() == 0:
        return torch.ones(batch_size, device=device, dtype=dtype)
    if value_checks_on(flat.device, check_values) and (int(flat.min()) < 0 or int(flat.max()) >= batch_size):
        raise ValueError(f"indices_tuple must index the batch's {batch_size} rows")
    inside = (flat >= 0) & (flat < batch_size)  # unchecked: an index outside the batch counts for none
    counts = torch.zeros(batch_size + 1, device=flat.device, dtype=dtype).index_add_(
        0, torch.where(inside, flat, batch_size), torch.ones_like(flat, dtype=dtype))[:batch_size]
    return counts / counts.max().clamp_min(1)  # no index inside the batch (unchecked): all weights 0


def _same_tensor(a: Optional[torch.Tensor], b: torch.Tensor, hooked: bool, recomputing: bool = False) -> bool:
    """``a`` is ``b``, or (``hooked``: a module's full backward hook has handed ``forward`` new
    objects for its positional inputs, :func:`_hook_may_wrap`) the hook's wrapper of ``b``: a
    tensor object over the same memory with the same shape, strides, dtype and gradient
    requirement, which for tensors that require a gradient must stand for the same tensor to
    autograd (:func:`_grad_identity`: the hook's wrapper stands for the tensor it wrapped): under
    such a hook ``ref_emb=embeddings`` silently became a reference set, each sample its own
    neighbour (a user-loop probe, 2026-12-07). A copy (``.clone()``), a ``.detach()`` or a view
    the caller made (``embeddings[:]``) is another tensor: taken for the batch, the same call's
    loss differed between training and evaluation (probes, 2026-12-07). (Labels require no
    gradient and have no such identity: under a hook a view of ``labels`` over the same memory
    passed as ``ref_labels`` counts as ``labels``.)

    ``recomputing`` (:func:`_recomputing`: a forward run inside a backward pass, as reentrant
    activation checkpointing reruns it, each input detached on its own): two leaves over the same
    memory are the one tensor the first forward was given (``checkpoint(loss, emb, y, None, emb,
    y, use_reentrant=True)`` recomputed with a reference set, and its gradients were 15% off; a
    machinery probe, 2026-12-07). The recomputation cannot tell a view the caller made from the
    tensor itself: ``ref_emb=emb[:]`` is read as the batch there (README: pass the tensor or a copy)."""
    if a is b:
        return True
    if not (hooked or recomputing):
        return False
    if not isinstance(a, torch.Tensor) or a.device != b.device or a.device.type == "meta" or _is_tracing():
        return False  # torch.compile keeps the objects (and traces no data_ptr)
    if any(t.layout != torch.strided or t.is_nested for t in (a, b)):  # no strides: checked as the argument it is
        return False
    if (a.shape, a.dtype, a.requires_grad) != (b.shape, b.dtype, b.requires_grad) or a.stride() != b.stride():
        return False
    if a.requires_grad and not (hooked and _same_identity(a, b)) and not (
            recomputing and a.grad_fn is None and b.grad_fn is None):
        return False  # neither the hook's wrapper of the other nor two detached leaves
    try:
        return a.data_ptr() == b.data_ptr() != 0
    except (RuntimeError, NotImplementedError):  # no storage (a fake or functional tensor): not the same
        return False


def _grad_identity(t: torch.Tensor) -> Tuple[Any, int]:
    """What autograd knows a tensor that requires a gradient as: ``(node, output number)`` of the
    operation that made it, ``(t, 0)`` for a leaf; for a full backward hook's wrapper (a
    ``BackwardHookFunctionBackward`` output), the identity of the tensor it wrapped. A view the
    caller made has a node of its own; the hook's wrapper of a view (a view of a view: its
    ``_base`` is the root) is known by the view's node."""
    fn = t.grad_fn
    if fn is not None and type(fn).__name__ == "BackwardHookFunctionBackward":
        fn, nr = fn.next_functions[t.output_nr]  # the wrapped tensor's node (input i is output i)
        leaf = getattr(fn, "variable", None)  # a leaf's AccumulateGrad
        return (leaf, 0) if leaf is not None else (fn, nr)
    return (t, 0) if fn is None else (fn, t.output_nr)


def _same_identity(a: torch.Tensor, b: torch.Tensor) -> bool:
    (na, ia), (nb, ib) = _grad_identity(a), _grad_identity(b)
    return na is nb and ia == ib


def _recomputing() -> bool:
    """Whether this call runs inside a backward pass (reentrant activation checkpointing reruns the
    forward there, on inputs it detached one by one)."""
    current = getattr(torch._C, "_current_graph_task_id", None)
    return current is not None and not _is_tracing() and current() != -1  # compiled: the objects are kept


def _hook_may_wrap(module: nn.Module, *tensors: Optional[torch.Tensor]) -> bool:
    """Whether a full backward hook (or backward pre-hook) of ``module``, or a global one, hands
    ``forward`` new objects for its positional tensor inputs: there is one, gradients are enabled
    and an input requires one (``torch.utils.hooks.BackwardHook``)."""
    if not (torch.is_grad_enabled() and any(isinstance(t, torch.Tensor) and t.requires_grad for t in tensors)):
        return False
    try:  # the module's and the global hooks, as Module.__call__ reads them
        full, _ = module._get_backward_hooks()
        return bool(full or module._get_backward_pre_hooks())
    except AttributeError:  # a PyTorch without these: assume a hook may wrap
        return True


class DAALLoss(nn.Module):
    """Density-Aware Adaptive Line margin loss with learnable class segments.

    ``loss = DAALLoss(num_classes, embedding_dim)``; ``loss(embeddings, labels)`` -> scalar.
    The segments (``loss.segments``, C x 2 x D: ``[:, 0]`` = p, ``[:, 1]`` = q) are a parameter:
    add ``loss.parameters()`` to the optimiser (usually with a larger learning rate).
    Keyword arguments are the hyperparameters of docs/method.md (the fields of
    :class:`daal_triton.Hyperparameters`: ``k``, ``m0``, ``m_min``, ``m_max``, ``gamma``,
    ``alpha``, ``tau``, ``lambda_pull``, ``lambda_dens``, ``lambda_len``, ``l_max``,
    ``normalize``, ``reduction``), validated here; ``backend`` (``"auto"``, ``"triton"``,
    ``"reference"``); ``check_values``: the NaN/inf and label-range checks on GPU tensors, which
    synchronise the host with the GPU (off by default there, on for CPU tensors except while
    ``torch.compile`` traces; see
    ``daal_triton.daal_loss``); ``point_proxies=True``: each class a single learnable point
    (``p = q``, ``segments`` is C x 1 x D), DAAL without its lines, for ablations.

    Each hyperparameter is also an attribute (``loss.alpha``, read from ``loss.hp``): setting one
    (``loss.alpha = 32.0``, a schedule's step) checks the value as the constructor does and takes
    effect on the next call; ``loss.hp = loss.hp.replace(m_min=..., m_max=...)`` changes several
    at once. ``num_classes``, ``embedding_dim`` and ``point_proxies`` are the segments' shape:
    read-only.
    """

    # The hyperparameter attributes (properties, made from Hyperparameters.names() at the end of
    # this module), declared with their Hyperparameters field types for type checkers and IDEs:
    k: int
    m0: float
    m_min: float
    m_max: float
    gamma: float
    alpha: float
    tau: float
    lambda_pull: float
    lambda_dens: float
    lambda_len: float
    l_max: float
    normalize: bool
    reduction: str
    # read-only, from the constructor (properties: _fixed)
    num_classes: int
    embedding_dim: int
    point_proxies: bool

    def __init__(self, num_classes: int, embedding_dim: Optional[int] = None, *,
                 embedding_size: Optional[int] = None, k: int = 3, m0: float = 0.2,
                 m_min: float = 0.05, m_max: float = 0.5, gamma: float = 1.0, alpha: float = 16.0,
                 tau: float = 0.8, lambda_pull: float = 0.0, lambda_dens: float = 0.5,
                 lambda_len: float = 0.0, l_max: float = 1.0, normalize: bool = True,
                 reduction: str = "mean", backend: str = "auto", init_length: float = 0.2,
                 check_values: Optional[bool] = None, point_proxies: bool = False) -> None:
        super().__init__()
        num_classes = as_int(num_classes, "num_classes")
        if (embedding_dim is None) == (embedding_size is None):
            raise ValueError("give the embedding width once: embedding_dim (or its "
                             "pytorch-metric-learning name, embedding_size)")
        embedding_dim = embedding_size if embedding_dim is None else embedding_dim
        embedding_dim = as_int(embedding_dim, "embedding_dim")
        init_length = as_float(init_length, "init_length")
        if init_length < 0:
            raise ValueError(f"init_length must be >= 0, got {init_length!r}")
        if backend not in BACKENDS:
            raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
        # read-only (:func:`_fixed`): the segments' shape, which assigning them never changed (a
        # num_classes assigned did nothing, a point_proxies assigned failed at the next call)
        self.__dict__.update(_num_classes=num_classes, _embedding_dim=embedding_dim,
                             _point_proxies=check_flag(point_proxies, "point_proxies", optional=False))
        self.hp = Hyperparameters(k=k, m0=m0, m_min=m_min, m_max=m_max, gamma=gamma, alpha=alpha,
                                  tau=tau, lambda_pull=lambda_pull, lambda_dens=lambda_dens,
                                  lambda_len=lambda_len, l_max=l_max, normalize=normalize,
                                  reduction=reduction)
        self.backend = backend
        self.check_values = check_flag(check_values, "check_values")
        self.init_length = init_length
        segments = init_segments(num_classes, embedding_dim, length=0.0 if self.point_proxies else init_length)
        # Point proxies (an ablation: DAAL without lines) keep one end point per class, C x 1 x D.
        self.segments = nn.Parameter(segments[:, :1].clone() if self.point_proxies else segments)

    @torch.no_grad()
    def reset_parameters(self, generator: Optional[torch.Generator] = None) -> None:
        """Draw the segments again (:func:`init_segments`, the constructor's ``init_length``), in
        place, keeping their dtype and device: for a module built on the meta device and
        materialised with ``to_empty()``."""
        fresh = init_segments(self.num_classes, self.embedding_dim,
                              length=0.0 if self.point_proxies else getattr(self, "init_length", 0.2),
                              generator=generator)
        self.segments.copy_(fresh[:, :1] if self.point_proxies else fresh)

    def endpoints(self) -> torch.Tensor:
        """The C x 2 x D segments the loss uses (``p = q`` for point proxies)."""
        if not self.point_proxies:
            return self.segments
        # autocast off: its cat refuses half-precision segments of the other half type (a .half()
        # module under a bfloat16 region was a RuntimeError from autocast's type promotion)
        with _no_autocast(self.segments.device):
            return torch.cat([self.segments, self.segments], 1)

    @property
    def hp(self) -> Hyperparameters:
        """The hyperparameters (an immutable :class:`Hyperparameters`): assign a new one, e.g.
        ``loss.hp = loss.hp.replace(m_min=..., m_max=...)``, to change several at once; anything
        else is a ``ValueError`` naming ``hp`` (a dict failed at the next call, an AttributeError).
        They are the module's settings, not its state: ``state_dict()`` holds the segments only."""
        try:
            return self.__dict__["_hp"]
        except KeyError:  # not built (DAALLoss.__new__): hasattr says False, as for any missing attribute
            raise AttributeError("'DAALLoss' object has no attribute 'hp' (the module was not initialised)") from None

    @hp.setter
    def hp(self, value: Hyperparameters) -> None:
        if not isinstance(value, Hyperparameters):
            raise ValueError(f"hp must be a daal_triton.Hyperparameters (e.g. loss.hp.replace(alpha=32.0), or "
                             f"Hyperparameters(**loss.hparams)), got {type(value).__name__}")
        self.__dict__["_hp"] = value

    def __setstate__(self, state: Dict[str, Any]) -> None:
        if "hp" in state:  # pickled before hp was a property
            state["_hp"] = state.pop("hp")
        for name in _FIXED:  # pickled before these were read-only
            if name in state:
                state["_" + name] = state.pop(name)
        state.setdefault("_point_proxies", False)
        super().__setstate__(state)

    @property
    def hparams(self) -> Dict[str, Any]:
        """The hyperparameters as a dict (a copy of ``self.hp``'s fields)."""
        return self.hp.as_dict()

    def _is_the_batch(self, embeddings, labels, ref_emb, ref_labels) -> bool:
        """``ref_emb`` (and ``ref_labels``, when given) are the batch itself (:func:`_same_tensor`);
        the hooks and the backward pass are looked up only for a reference set that is not the
        same object (the loss's hot path has none)."""
        if ref_emb is embeddings and (ref_labels is None or ref_labels is labels):
            return True
        hooked, again = _hook_may_wrap(self, embeddings, ref_emb), _recomputing()
        return _same_tensor(ref_emb, embeddings, hooked, again) and (
            ref_labels is None or _same_tensor(ref_labels, labels, hooked, again))

    def __prepare_scriptable__(self):
        """``torch.jit.script`` calls this first: a named refusal (see ``TORCHSCRIPT_REFUSAL``)."""
        raise NotImplementedError(TORCHSCRIPT_REFUSAL.format(what="DAALLoss"))

    def forward(self, embeddings: torch.Tensor, labels: torch.Tensor,
                indices_tuple: Optional[Tuple[torch.Tensor, ...]] = None,
                ref_emb: Optional[torch.Tensor] = None,
                ref_labels: Optional[torch.Tensor] = None,
                ref_includes_batch: bool = False) -> torch.Tensor:
        """``embeddings`` B x D, ``labels`` B, in pytorch-metric-learning's order.

        ``indices_tuple``: a miner's output (pairs or triplets of batch indices); as in
        pytorch-metric-learning's proxy losses, each sample's terms are weighted by how often it
        appears in the tuples (relative to the most frequent; absent samples weigh 0). With
        ``ref_emb`` the tuple is read as mined against it (``miner(emb, labels, ref_emb,
        ref_labels)``): only its anchors count, as pytorch-metric-learning's ``using_ref``.
        ``ref_emb``/``ref_labels``: an optional reference set (memory bank) over which the kNN
        radii are taken; ``ref_includes_batch=True`` when ``ref_emb[:B]`` is the batch itself
        (see ``daal_triton.daal_loss``). ``ref_emb`` that *is* ``embeddings`` (the same tensor,
        with ``ref_labels`` None or ``labels`` itself, or another tensor object over the same memory,
        as a module hook hands ``forward``) means no reference set, as in pytorch-metric-learning."""
        if ref_emb is not None and self._is_the_batch(embeddings, labels, ref_emb, ref_labels):
            ref_emb = ref_labels = None
            ref_includes_batch = False  # "the reference set starts with the batch": it is the batch
        weights = None
        if indices_tuple is not None:
            check_float_matrix(embeddings, "embeddings", values=False)  # the weights need its B
            # the loss's dtype (at least float32): a float64 bank makes it float64
            dtype = torch.promote_types(inputs_dtype(embeddings, self.segments, ref_emb), torch.float32)
            weights = miner_weights(indices_tuple, embeddings.shape[0], device=embeddings.device,
                                    using_ref=ref_emb is not None, dtype=dtype, check_values=self.check_values)
        return loss_with(embeddings, labels, self.endpoints(), self.hp, ref_embeddings=ref_emb,
                         ref_labels=ref_labels, ref_includes_batch=ref_includes_batch,
                         backend=self.backend, check_values=self.check_values,
                         sample_weights=weights, ref_name="ref_emb")

    def extra_repr(self) -> str:
        hp = ", ".join(f"{k}={v!r}" for k, v in self.hparams.items())
        points = ", point_proxies=True" if self.point_proxies else ""
        checks = "" if self.check_values is None else f", check_values={self.check_values}"
        return (f"num_classes={self.num_classes}, embedding_dim={self.embedding_dim}, {hp}, "
                f"backend={self.backend!r}, init_length={getattr(self, 'init_length', 0.2)!r}{checks}{points}")


for _name in Hyperparameters.names():  # before this, ``loss.alpha = 32.0`` set an attribute nothing read
    setattr(DAALLoss, _name, _hyperparameter(_name))
for _name in _FIXED:
    setattr(DAALLoss, _name, _fixed(_name))
