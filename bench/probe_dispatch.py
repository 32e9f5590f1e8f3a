"""Host cost of one operator call: a torch.library custom op (with autograd) against an
autograd.Function around the same (empty) work, on whatever device this runs on (CPU tensors).

usage: python bench/probe_dispatch.py   (prints microseconds per call)
"""
import time, torch
@torch.library.custom_op("probe::ident", mutates_args=())
def ident(x: torch.Tensor, k: int) -> torch.Tensor:
    return x.new_empty(x.shape)
@ident.register_fake
def _(x, k): return x.new_empty(x.shape)
@torch.library.custom_op("probe::ident_bwd", mutates_args=())
def ident_bwd(g: torch.Tensor) -> torch.Tensor:
    return g.new_empty(g.shape)
@ident_bwd.register_fake
def _(g): return g.new_empty(g.shape)
def setup(ctx, inputs, output): pass
def bwd(ctx, g): return ident_bwd(g), None
ident.register_autograd(bwd, setup_context=setup)
class F(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, k): return x.new_empty(x.shape)
    @staticmethod
    def backward(ctx, g): return g.new_empty(g.shape), None
x = torch.randn(16, requires_grad=True); xn = torch.randn(16)
def t(fn, n=20000):
    fn(); t0 = time.perf_counter()
    for _ in range(n): fn()
    return (time.perf_counter() - t0) / n * 1e6
print("new_empty          ", t(lambda: xn.new_empty(xn.shape)))
print("custom op no grad  ", t(lambda: ident(xn, 3)))
print("custom op grad fwd ", t(lambda: ident(x, 3)))
print("torch.ops call     ", t(lambda: torch.ops.probe.ident(xn, 3)))
print("autograd.Function  ", t(lambda: F.apply(x, 3)))
print("custom op fwd+bwd  ", t(lambda: ident(x, 3).sum().backward(), 5000))
print("autograd.F fwd+bwd ", t(lambda: F.apply(x, 3).sum().backward(), 5000))
