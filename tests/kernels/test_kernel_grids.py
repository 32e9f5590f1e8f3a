"""Launch grids within CUDA's limits at extreme shapes: gridDim.y and gridDim.z are at most 65535
(``_common.MAX_GRID_YZ``; gridDim.x 2^31 - 1). The kernels are replaced by recorders (nothing
runs), the launchers use the GPU's block sizes and an H200's 132 SMs."""
import pytest
import torch

from daal_triton.kernels import _common, line_margin as lm, pairwise as kp


class Recorder:
    def __init__(self, name, grids):
        self.name, self.grids = name, grids

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            self.grids.append((self.name, tuple(grid)))
        return launch


@pytest.fixture
def grids(monkeypatch):
    """Every launch of the line-margin and pairwise modules, recorded (kernel, grid)."""
    seen = []
    for mod in (lm, kp):
        for name in dir(mod):
            if name.startswith("_") and name.endswith("_kernel"):
                monkeypatch.setattr(mod, name, Recorder(name, seen))
    monkeypatch.setattr(_common, "_sqnorm_kernel", Recorder("_sqnorm_kernel", seen))
    monkeypatch.setattr(lm, "config_family", lambda dtype, interpret=None: _common.family(dtype))
    monkeypatch.setattr(kp, "config_family", lambda dtype, interpret=None: _common.family(dtype), raising=False)
    monkeypatch.setattr(lm, "sm_count", lambda device: 132)
    monkeypatch.setattr(lm, "mm_f32", lambda a, b: torch.zeros(a.shape[0], b.shape[1]), raising=False)
    return seen


def _check(seen):
    assert seen
    over = [(name, grid) for name, grid in seen if any(g > _common.MAX_GRID_YZ for g in grid[1:])]
    assert not over, over


@pytest.mark.parametrize("B", [1, 7])
def test_line_margin_backward_at_three_million_classes(grids, B):
    """A small last batch against C = 3M classes: the backward's class tiles per chunk (the
    grid's second axis) were 93,720 at B = 1 before the cap."""
    C, D = 3_000_000, 2
    x = torch.randn(B, D, requires_grad=True)
    seg = torch.randn(C, 2, D, requires_grad=True)
    out = lm.line_margin(x, torch.zeros(B, dtype=torch.long), seg, torch.full((B,), 0.2), alpha=16.0,
                         lambda_pull=0.0)
    out.sum().backward()
    assert any(name == "_lm2_bwd_kernel" for name, _ in grids)
    _check(grids)


def test_pairwise_backward_against_four_million_rows(grids):
    """The pairwise backward's H tiles (M/64 x N/64) went on two axes: 65,536 column tiles at
    N = 2^22."""
    x = torch.randn(1, 2, requires_grad=True)
    y = torch.randn(4_194_304, 2, requires_grad=True)
    d = kp.pairwise_distance(x, y)
    d.backward(torch.ones_like(d))
    assert any(name == "_pairwise_h_kernel" for name, _ in grids)
    _check(grids)


def test_chunk_classes_caps_the_class_tiles():
    for B in (1, 2, 7, 64):
        cc = lm.chunk_classes(B, 10_000_000, 64, 32, 132)
        assert cc // 32 <= _common.MAX_GRID_YZ
