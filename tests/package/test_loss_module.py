"""DAALLoss: the module users train with."""
import pytest
import torch

import daal_triton as dt
from daal_testing import random_problem


def test_segments_parameter_and_initialisation():
    loss = dt.DAALLoss(7, 16)
    assert isinstance(loss.segments, torch.nn.Parameter) and loss.segments.shape == (7, 2, 16)
    p, q = loss.segments[:, 0].detach(), loss.segments[:, 1].detach()
    mid = (p + q) / 2
    assert torch.allclose(mid.norm(dim=1), torch.ones(7), atol=1e-5)  # midpoints on the sphere
    assert torch.allclose((q - p).norm(dim=1), torch.full((7,), 0.2), atol=1e-5)
    assert ((q - p) * mid).sum(1).abs().max() < 1e-5  # tangent to the sphere
    assert list(dict(loss.named_parameters())) == ["segments"]


def test_forward_equals_functional_and_trains():
    z, y, _ = random_problem(20, 4, 8, dtype=torch.float32)
    loss = dt.DAALLoss(4, 8, lambda_pull=0.1, backend="reference")
    value = loss(z, y)
    same = dt.daal_loss(z, y, loss.segments, lambda_pull=0.1, backend="reference")
    assert value.item() == same.item()
    opt = torch.optim.SGD(loss.parameters(), lr=0.5)
    before = loss.segments.detach().clone()
    value.backward()
    opt.step()
    assert not torch.equal(before, loss.segments.detach())
    assert loss(z, y).item() < value.item()


def test_state_dict_round_trip_and_repr():
    a, b = dt.DAALLoss(3, 5), dt.DAALLoss(3, 5)
    b.load_state_dict(a.state_dict())
    assert torch.equal(a.segments, b.segments)
    assert "alpha=16.0" in repr(a) and "num_classes=3" in repr(a)


def test_memory_bank_reference_set():
    z, y, seg = random_problem(8, 2, 4, dtype=torch.float32)
    bank, bank_y = torch.randn(30, 4), torch.arange(30) % 2
    loss = dt.DAALLoss(2, 4, backend="reference")
    with torch.no_grad():
        loss.segments.copy_(seg)
    parts = dt.daal_loss(z, y, seg, ref_embeddings=bank, ref_labels=bank_y, return_parts=True,
                         backend="reference")
    x = torch.nn.functional.normalize(z, dim=1)
    xb = torch.nn.functional.normalize(bank, dim=1)
    d = torch.cdist(x.double(), xb.double())
    d[y[:, None] != bank_y[None, :]] = float("inf")
    expected = d.topk(3, largest=False).values.mean(1)
    assert torch.allclose(parts.radius.double(), expected, atol=1e-5)
    assert torch.allclose(loss(z, y, ref_emb=bank, ref_labels=bank_y), parts.loss)


def test_memory_bank_that_starts_with_the_batch_excludes_self():
    z, y, seg = random_problem(8, 2, 4, dtype=torch.float64)
    bank, bank_y = torch.randn(12, 4, dtype=torch.float64), torch.arange(12) % 2
    ref, ref_y = torch.cat([z, bank]), torch.cat([y, bank_y])
    parts = dt.daal_loss(z, y, seg, ref_embeddings=ref, ref_labels=ref_y, ref_includes_batch=True,
                         return_parts=True, k=2)
    x = torch.nn.functional.normalize(torch.cat([z, bank]), dim=1)
    d = torch.cdist(x[:8], x)
    d[y[:, None] != ref_y[None, :]] = float("inf")
    d[torch.arange(8), torch.arange(8)] = float("inf")
    assert torch.allclose(parts.radius, d.topk(2, largest=False).values.mean(1), atol=1e-10)
    assert (parts.neighbors != torch.arange(8)[:, None]).all()
    with pytest.raises(ValueError, match="ref_includes_batch=True needs ref_embeddings"):
        dt.daal_loss(z, y, seg, ref_includes_batch=True)


def test_point_proxies_hold_zero_length_segments():
    """The ablation: one learnable point per class; the loss sees p = q, and training keeps it so."""
    loss = dt.DAALLoss(4, 6, point_proxies=True, backend="reference", lambda_len=1.0)
    assert loss.segments.shape == (4, 1, 6)
    z, y = torch.randn(10, 6), torch.arange(10) % 4
    opt = torch.optim.SGD(loss.parameters(), lr=0.1)
    for _ in range(3):
        opt.zero_grad()
        out = loss(z, y)
        out.backward()
        opt.step()
    seg = loss.endpoints()
    assert torch.equal(seg[:, 0], seg[:, 1])
    same = dt.daal_loss(z, y, seg.detach(), backend="reference", lambda_len=1.0)
    assert torch.allclose(loss(z, y), same)
    with pytest.raises(ValueError, match="point_proxies"):
        dt.DAALLoss(4, 6, point_proxies=1)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True], ids=["default", "deterministic"])
def test_triton_gradients_are_reproducible(deterministic):
    """On a GPU, two forward+backward passes of DAALLoss (Triton backend) give the same bits for
    the segments' gradient (the line margin's backward has no atomics); under
    ``torch.use_deterministic_algorithms(True)`` for the embeddings' gradient too (the kNN's
    reference-set gradient is then summed per pair in a fixed order). Assumes cuBLAS repeats its
    GEMMs bit for bit in one stream (warn_only: no CUBLAS_WORKSPACE_CONFIG needed)."""
    z, y, _ = random_problem(180, 100, 512, dtype=torch.float32, device="cuda")
    module = dt.DAALLoss(100, 512, backend="triton").cuda()
    before, warn = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
    try:
        runs = []
        for _ in range(2):
            zz = z.clone().requires_grad_()
            runs.append(torch.autograd.grad(module(zz, y), (zz, module.segments)))
    finally:
        torch.use_deterministic_algorithms(before, warn_only=warn)
    assert torch.equal(runs[0][1], runs[1][1]), "segment gradient"
    if deterministic:
        assert torch.equal(runs[0][0], runs[1][0]), "embedding gradient"
