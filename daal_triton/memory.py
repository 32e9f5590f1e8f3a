"""A cross-batch memory: a FIFO queue of recent detached embeddings and labels.

Used as DAAL's reference set for the kNN density, so radii are estimated from many more
same-class samples than one batch holds::

    bank = MemoryBank(size=4096, dim=512)
    ref, ref_labels = bank.with_batch(emb, labels)          # batch first, then the bank (detached)
    loss = loss_fn(emb, labels, ref_emb=ref, ref_labels=ref_labels, ref_includes_batch=True)
    bank.enqueue(emb, labels)                               # detached; oldest rows drop out

In distributed runs, enqueue the *gathered* global batch on every rank (the training program
does this), so each rank holds the same bank.
"""
from __future__ import annotations

from typing import List, Optional, Tuple, Union

import torch

from .core import _no_autocast
from .validation import FLOAT_DTYPES, as_int, check_finite, check_float_matrix, check_labels, value_checks_on


def _shares_memory(a: torch.Tensor, b: torch.Tensor) -> bool:
    """``a`` and ``b`` are views of one storage (the same one, not merely equal values)."""
    try:
        return a.untyped_storage().data_ptr() == b.untyped_storage().data_ptr() != 0
    except (RuntimeError, NotImplementedError):  # no storage (fake or functional tensors)
        return False


class MemoryBank:
    """FIFO queue of ``size`` embeddings (``dim`` wide) and their labels.

    ``dtype`` (a floating type) is the storage precision, your choice: enqueued rows are stored
    in it (a float16 bank saves memory and rounds float32 rows; float16 overflows to inf beyond
    65504, which :meth:`enqueue` then refuses or, with value checks off, the loss leaves out)."""

    def __init__(self, size: int, dim: int, *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        size, dim = as_int(size, "size"), as_int(dim, "dim")
        if dtype not in FLOAT_DTYPES:
            raise ValueError(f"dtype must be torch.float16, bfloat16, float32 or float64 (the bank's storage "
                             f"precision), got {dtype!r}")
        try:
            device = torch.device(device)
        except (RuntimeError, TypeError):
            raise ValueError(f"device must be a torch.device or a device string such as 'cuda:0', got {device!r}") \
                from None
        self.size, self.dim = size, dim
        self.embeddings = torch.zeros(size, dim, device=device, dtype=dtype)
        self.labels = torch.full((size,), -1, device=device, dtype=torch.long)
        self.ptr = 0  # next row to write
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    def _check_rows(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        check_float_matrix(embeddings, "embeddings", values=False)
        if embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}), got {tuple(embeddings.shape)}")
        check_labels(labels, "labels", embeddings.shape[0], None, values=False)

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor, *,
                check_values: Optional[bool] = None) -> None:
        """Append detached rows (stored in the bank's dtype), overwriting the oldest once full (the
        newest ``size`` stay).

        With the value checks (always for CPU tensors; on a GPU with ``check_values=True`` or
        ``DAAL_CHECK_VALUES=1``, as the loss's, docs/method.md "Bad input") rows that are NaN or
        inf once stored (a float16 bank overflows beyond 65504) are refused before anything is
        written: otherwise they would stay in the bank for ``size`` rows, and every loss call
        given it would be refused (or, with checks off, leave them out). Labels may be any
        integers: a row whose label is no batch sample's is never a neighbour."""
        self._check_rows(embeddings, labels)
        emb = embeddings.detach()[-self.size:].to(self.embeddings)
        lab = labels.detach()[-self.size:].to(self.labels)
        # rows of the bank itself (``get()``'s views) are copied first: the ring's writes would
        # overwrite them while they are read (PyTorch refused the overlap with a RuntimeError)
        emb, lab = (t.clone() if _shares_memory(t, dst) else t for t, dst in ((emb, self.embeddings), (lab, self.labels)))
        if value_checks_on(emb.device, check_values):
            check_finite(emb, "embeddings" if emb.dtype == embeddings.dtype
                         else f"embeddings (stored as {str(self.embeddings.dtype).replace('torch.', '')})")
        n = emb.shape[0]
        # the ring as at most two slices (no index tensor: two copies, not arange, % and a scatter)
        first = min(n, self.size - self.ptr)
        for dst, src in ((self.embeddings, emb), (self.labels, lab)):
            dst[self.ptr:self.ptr + first].copy_(src[:first])
            dst[:n - first].copy_(src[first:])
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def _oldest_first(self) -> Tuple[List[torch.Tensor], List[torch.Tensor]]:
        """The stored rows and labels as slices of the ring, oldest first (views, no copy)."""
        if self.filled < self.size or self.ptr == 0:
            n = self.filled
            return [self.embeddings[:n]], [self.labels[:n]]
        return ([self.embeddings[self.ptr:], self.embeddings[:self.ptr]],
                [self.labels[self.ptr:], self.labels[:self.ptr]])

    def get(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored rows (oldest first) and their labels: views of the bank's storage while
        the oldest row is its first (a later :meth:`enqueue` writes into them), else copies."""
        emb, lab = self._oldest_first()
        if len(emb) == 1:
            return emb[0], lab[0]
        return torch.cat(emb), torch.cat(lab)

    def with_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cat([embeddings.detach(), bank]), cat([labels, bank_labels]))``: a reference set whose
        first rows are the batch (pass ``ref_includes_batch=True`` to the loss). It carries no
        gradient at all: with ``ref_includes_batch=True`` the loss itself passes the batch rows'
        reference-role gradient (the density's, as neighbours of other samples) to ``embeddings``
        (docs/method.md, "Memory banks"), so the backward builds no (B + N) x D gradient of the
        reference set only to drop its bank rows: the Triton backend's kNN and normalisation
        backwards allocate no (B + N) x D float32 buffer (two of them before: 2 x 134 MB a step
        at N = 65,536, D = 512, by arithmetic). The bank comes to the batch's device, and the two
        meet in their promoted dtype (a float32 bank is not rounded to a bfloat16 batch's).

        A reference set built by hand that requires grad (``torch.cat([emb, bank])``, or a bank
        that is itself trained) keeps it: its rows receive their gradient through it, as before."""
        self._check_rows(embeddings, labels)
        emb, lab = self._oldest_first()
        # one torch.cat of the batch and the ring's slices: the bank is copied once, in the
        # promoted dtype (cat's type promotion), not gathered into order first and then copied
        # again (it moves to the batch's device first only where it lives elsewhere)
        emb = [e.to(embeddings.device) for e in emb]
        lab = [t.to(labels.device) for t in lab]
        # detached: the loss routes the batch rows' gradient itself (ref_includes_batch=True);
        # autocast off: its cat refuses a half-precision bank of the other half type
        with _no_autocast(embeddings.device):
            return torch.cat([embeddings.detach(), *emb]), torch.cat([labels.long(), *lab])

    def state_dict(self) -> dict:
        """A snapshot: copies of the rows and labels with the write position, so a state kept in
        memory (a best-so-far checkpoint) stays one consistent bank while this one moves on."""
        return {"embeddings": self.embeddings.clone(), "labels": self.labels.clone(), "ptr": self.ptr,
                "filled": self.filled}

    @torch.no_grad()  # the bank never carries a gradient, whatever the state's tensors require
    def load_state_dict(self, state: dict) -> None:
        for name, have in (("embeddings", self.embeddings), ("labels", self.labels)):
            got = state.get(name) if isinstance(state, dict) else None
            if not isinstance(got, torch.Tensor) or got.shape != have.shape:
                shape = tuple(got.shape) if isinstance(got, torch.Tensor) else type(got).__name__
                raise ValueError(f"state[{name!r}] must be a tensor of shape {tuple(have.shape)} "
                                 f"(this bank's size and dim), got {shape}")
        # the dtypes enqueue takes: float labels would be truncated, and NaN rows refused only by a
        # later loss call, as its ref_emb; the values as stored, as enqueue checks them (a float32
        # state's 1e5 is inf in a float16 bank: accepted before, then every loss call refused it)
        check_float_matrix(state["embeddings"], "state['embeddings']", values=False)
        if value_checks_on(state["embeddings"].device):
            stored = state["embeddings"].to(self.embeddings.dtype)
            check_finite(stored, "state['embeddings']" if stored.dtype == state["embeddings"].dtype
                         else f"state['embeddings'] (stored as {str(stored.dtype).replace('torch.', '')})")
        check_labels(state["labels"], "state['labels']", self.size, None, values=False)
        filled = as_int(state.get("filled"), "state['filled']", minimum=0)
        ptr = as_int(state.get("ptr"), "state['ptr']", minimum=0)
        if filled > self.size:
            raise ValueError(f"state['filled'] must be <= the bank's size {self.size}, got {filled}")
        if ptr >= self.size or (filled < self.size and ptr != filled):
            raise ValueError(f"state['ptr'] must be the next row to write: state['filled'] ({filled}) while the "
                             f"bank is filling, < size ({self.size}) once full; got {ptr}")
        self.embeddings.copy_(state["embeddings"])
        self.labels.copy_(state["labels"])
        self.ptr, self.filled = ptr, filled
