"""The FIFO cross-batch memory."""
import pytest
import torch

import daal_triton as dt
from daal_triton.memory import MemoryBank


def test_fifo_keeps_the_newest_rows_in_order():
    bank = MemoryBank(5, 2)
    assert len(bank) == 0 and bank.get()[0].shape == (0, 2)
    for start in (0, 3, 6):
        rows = torch.arange(start, start + 3, dtype=torch.float32)
        bank.enqueue(torch.stack([rows, -rows], 1), rows.long())
    emb, lab = bank.get()
    assert lab.tolist() == [4, 5, 6, 7, 8] and emb[:, 0].tolist() == [4, 5, 6, 7, 8]
    bank.enqueue(torch.zeros(7, 2), torch.arange(10, 17))  # more than it holds
    assert bank.get()[1].tolist() == [12, 13, 14, 15, 16]


def test_enqueue_detaches_and_validates():
    bank = MemoryBank(4, 3)
    e = torch.randn(2, 3, requires_grad=True)
    bank.enqueue(e * 2, torch.tensor([0, 1]))
    assert not bank.get()[0].requires_grad
    with pytest.raises(ValueError, match="embeddings must have shape"):
        bank.enqueue(torch.randn(2, 4), torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="size must be an integer"):
        MemoryBank(0, 3)


def test_bank_as_reference_set_changes_radii_and_keeps_gradients():
    torch.manual_seed(0)
    loss_fn = dt.DAALLoss(3, 4, backend="reference", tau=2.0)
    bank = MemoryBank(32, 4)
    bank.enqueue(torch.randn(32, 4), torch.arange(32) % 3)
    emb = torch.randn(9, 4, requires_grad=True)
    y = torch.arange(9) % 3
    ref, ref_y = bank.with_batch(emb, y)
    with_bank = loss_fn(emb, y, ref_emb=ref, ref_labels=ref_y, ref_includes_batch=True)
    alone = loss_fn(emb, y)
    assert with_bank.item() != alone.item()
    with_bank.backward()
    assert torch.isfinite(emb.grad).all() and emb.grad.abs().sum() > 0
    state = bank.state_dict()
    other = MemoryBank(32, 4)
    other.load_state_dict(state)
    assert torch.equal(other.get()[0], bank.get()[0])
