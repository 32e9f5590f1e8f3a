"""A cross-batch memory: a FIFO queue of recent detached embeddings and labels.

Used as DAAL's reference set for the kNN density, so radii are estimated from many more
same-class samples than one batch holds::

    bank = MemoryBank(size=4096, dim=512)
    ref, ref_labels = bank.with_batch(emb, labels)          # batch first, then the bank
    loss = loss_fn(emb, labels, ref_emb=ref, ref_labels=ref_labels, ref_includes_batch=True)
    bank.enqueue(emb, labels)                               # detached; oldest rows drop out

In distributed runs, enqueue the *gathered* global batch on every rank (the training program
does this), so each rank holds the same bank.
"""
from __future__ import annotations

from typing import Tuple, Union

import torch


class MemoryBank:
    """FIFO queue of ``size`` embeddings (``dim`` wide) and their labels."""

    def __init__(self, size: int, dim: int, *, device: Union[str, torch.device] = "cpu",
                 dtype: torch.dtype = torch.float32) -> None:
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise ValueError(f"size must be an integer >= 1, got {size!r}")
        if isinstance(dim, bool) or not isinstance(dim, int) or dim < 1:
            raise ValueError(f"dim must be an integer >= 1, got {dim!r}")
        self.size, self.dim = size, dim
        self.embeddings = torch.zeros(size, dim, device=device, dtype=dtype)
        self.labels = torch.full((size,), -1, device=device, dtype=torch.long)
        self.ptr = 0  # next row to write
        self.filled = 0

    def __len__(self) -> int:
        return self.filled

    @torch.no_grad()
    def enqueue(self, embeddings: torch.Tensor, labels: torch.Tensor) -> None:
        """Append detached rows, overwriting the oldest once full (the newest ``size`` stay)."""
        if embeddings.ndim != 2 or embeddings.shape[1] != self.dim:
            raise ValueError(f"embeddings must have shape (n, {self.dim}), got {tuple(embeddings.shape)}")
        if labels.shape != (embeddings.shape[0],):
            raise ValueError(f"labels must have shape ({embeddings.shape[0]},), got {tuple(labels.shape)}")
        emb = embeddings.detach()[-self.size:].to(self.embeddings)
        lab = labels.detach()[-self.size:].to(self.labels)
        n = emb.shape[0]
        idx = (self.ptr + torch.arange(n, device=self.embeddings.device)) % self.size
        self.embeddings[idx] = emb
        self.labels[idx] = lab
        self.ptr = (self.ptr + n) % self.size
        self.filled = min(self.size, self.filled + n)

    def get(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """The stored rows (oldest first) and their labels."""
        if self.filled < self.size:
            return self.embeddings[: self.filled], self.labels[: self.filled]
        order = (self.ptr + torch.arange(self.size, device=self.embeddings.device)) % self.size
        return self.embeddings[order], self.labels[order]

    def with_batch(self, embeddings: torch.Tensor, labels: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(cat([embeddings, bank]), cat([labels, bank_labels]))``: a reference set whose first
        rows are the batch (pass ``ref_includes_batch=True`` to the loss). The batch part keeps
        its gradient; the bank part has none."""
        emb, lab = self.get()
        return (torch.cat([embeddings, emb.to(embeddings.dtype)]),
                torch.cat([labels.long(), lab.to(labels.device)]))

    def state_dict(self) -> dict:
        return {"embeddings": self.embeddings, "labels": self.labels, "ptr": self.ptr, "filled": self.filled}

    def load_state_dict(self, state: dict) -> None:
        self.embeddings.copy_(state["embeddings"])
        self.labels.copy_(state["labels"])
        self.ptr, self.filled = int(state["ptr"]), int(state["filled"])
