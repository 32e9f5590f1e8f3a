"""What autograd does with the tensors the backends save: a saved-tensor hook (offload, compression:
``torch.autograd.graph.saved_tensors_hooks``) may give them back in another layout, and a backward
through one output alone must not write gradients the reference would not (an autograd probe,
2026-12-07: both were wrong on the Triton backend)."""
import pytest
import torch

import daal_triton as dt
from daal_testing import rel_err

BACKENDS = ["reference", pytest.param("triton", marks=pytest.mark.interpreter)]  # CPU tensors


def strided_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values, the last dimension's stride 2 (a copy in other memory; zeros between, so
    a kernel that ignores the stride reads wrong values, not out of bounds)."""
    if t.ndim == 0 or not t.numel():
        return t
    wide = t.new_zeros(*t.shape[:-1], 2 * t.shape[-1])[..., ::2]
    return wide.copy_(t)


def transposed_copy(t: torch.Tensor) -> torch.Tensor:
    """The same values, the last two dimensions stored column-major."""
    return t.mT.contiguous().mT if t.ndim >= 2 else strided_copy(t)


def _grads(fn, inputs, hook):
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    with torch.autograd.graph.saved_tensors_hooks(lambda t: hook(t) if hook else t, lambda t: t):
        out = fn(*leaves)
    (out.square().sum() if out.ndim else out).backward()
    return [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", [strided_copy, transposed_copy])
@pytest.mark.parametrize("normalize", [True, False])
def test_the_loss_gradients_do_not_depend_on_the_saved_tensors_layout(backend, hook, normalize):
    B, D, C = 37, 33, 11
    z, y = torch.randn(B, D), torch.randint(0, C, (B,))
    seg = dt.init_segments(C, D)

    def loss(e, s):
        return dt.daal_loss(e, y, s, backend=backend, normalize=normalize, k=3)

    plain, hooked = _grads(loss, (z, seg), None), _grads(loss, (z, seg), hook)
    for a, b in zip(plain, hooked):
        assert rel_err(b, a) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("hook", [strided_copy, transposed_copy])
def test_knn_and_pairwise_gradients_do_not_depend_on_the_saved_tensors_layout(backend, hook):
    q, r = torch.randn(21, 17), torch.randn(30, 17)

    def nearest(a, b):
        return dt.knn(a, b, 4, backend=backend)[0]

    def pairwise(a, b):
        return dt.pairwise_distance(a, b, backend=backend)

    for fn in (nearest, pairwise):
        plain, hooked = _grads(fn, (q, r), None), _grads(fn, (q, r), hook)
        for a, b in zip(plain, hooked):
            assert rel_err(b, a) < 1e-5, fn.__name__


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("part", ["density", "length"])
def test_a_backward_through_one_part_leaves_what_it_does_not_reach_without_gradient(backend, part):
    """``parts.density`` does not depend on the segments, ``parts.length`` not on the embeddings:
    their gradients stay None (zeros would be moved by weight decay and momentum), as autograd
    leaves them on the reference."""
    B, D, C = 24, 8, 3
    z = torch.randn(B, D, requires_grad=True)
    seg = dt.init_segments(C, D).requires_grad_()
    y = torch.arange(B) % C
    parts = dt.daal_loss(z, y, seg, backend=backend, return_parts=True, tau=2.0, lambda_len=1.0)
    getattr(parts, part).backward()
    untouched = seg if part == "density" else z
    assert untouched.grad is None
    reached = z if part == "density" else seg
    assert reached.grad is not None
