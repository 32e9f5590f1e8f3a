"""The VGG-19 embedding network and the pieces of the training engine."""
import math

import pytest
import torch

pytest.importorskip("torchvision")

from daal_triton.train import config, devices, engine  # noqa: E402
from daal_triton.train.model import EmbeddingNet  # noqa: E402


def test_embedding_net_shapes_and_weights(tmp_path):
    import torchvision

    ref = torchvision.models.vgg19_bn(weights=None)
    path = str(tmp_path / "vgg19_bn.pth")
    torch.save(ref.state_dict(), path)
    net = EmbeddingNet("vgg19_bn", 24, weights=path)
    assert net.pretrained
    assert torch.equal(net.trunk[0].weight, ref.features[0].weight)
    net.eval()
    x = torch.randn(2, 3, 32, 32)
    assert net(x).shape == (2, 24)
    assert net.features(x).shape == (2, 512)
    with pytest.raises(ValueError, match="vgg19 vs vgg19_bn") as err:
        EmbeddingNet("vgg19", 8, weights=path)
    assert "(size mismatch for " in str(err.value) and "Error(s) in loading" not in str(err.value)
    with pytest.raises(FileNotFoundError, match="never downloads"):
        EmbeddingNet("vgg19_bn", 8, weights=str(tmp_path / "missing.pth"))
    with pytest.raises(ValueError, match="arch"):
        EmbeddingNet("resnet50", 8)


def test_optimizer_groups_and_schedule():
    model = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4))
    crit = engine.build_criterion("daal", 3, 4, backend="reference")
    opt = engine.make_optimizer(model, crit, lr=1e-4, loss_lr=1e-2, weight_decay=0.1)
    lrs = sorted(g["lr"] for g in opt.param_groups)
    assert lrs == [1e-4, 1e-4, 1e-2]
    seg_group = [g for g in opt.param_groups if any(p is crit.segments for p in g["params"])][0]
    assert seg_group["lr"] == 1e-2 and seg_group["weight_decay"] == 0.0
    seen = _rates(opt, engine.make_scheduler(opt, total_steps=10, warmup_steps=2), 10)
    assert seen[0] == pytest.approx(0.5e-4) and seen[1] == pytest.approx(1e-4)
    assert seen[-1] < 0.1e-4 and all(a >= b for a, b in zip(seen[1:], seen[2:]))


def test_a_step_the_scaler_skips_advances_the_schedule_without_a_warning():
    # fp16's GradScaler skips steps with inf gradients (forced here by a huge initial scale): the
    # schedule goes on (documented), and PyTorch's "lr_scheduler.step() before optimizer.step()"
    # warning is not printed in the middle of a run
    import warnings

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(12, 4))
    crit = engine.build_criterion("daal", 3, 4, backend="reference")
    opt = engine.make_optimizer(model, crit, lr=1e-3, loss_lr=5e-3, weight_decay=1e-4)
    sched = engine.make_scheduler(opt, 10, 2)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 60)  # float16 gradients overflow
    x, y = torch.randn(6, 3, 2, 2), torch.tensor([0, 0, 1, 1, 2, 2])
    before = [p.detach().clone() for p in model.parameters()]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for _ in range(2):
            engine.train_step(model, crit, x, y, opt, sched, amp_dtype=torch.float16, scaler=scaler)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))  # both steps skipped
    assert sched.last_epoch == 2 and scaler.get_scale() == 2.0 ** 58
    assert not [w for w in caught if "lr_scheduler.step()" in str(w.message)], [str(w.message) for w in caught]


def test_build_criterion_daal_uses_training_defaults_and_overrides():
    crit = engine.build_criterion("daal", 5, 8, daal={"alpha": 8.0}, backend="reference")
    assert crit.hparams["alpha"] == 8.0
    assert crit.segments.shape == (5, 2, 8)
    emb = torch.randn(6, 8, requires_grad=True)
    loss = engine.loss_from_embeddings(crit, emb, torch.tensor([0, 0, 1, 1, 2, 2]))
    loss.backward()
    assert math.isfinite(loss.item()) and emb.grad is not None
    with pytest.raises(ValueError, match="--loss"):
        engine.build_criterion("triplet", 5, 8)


def test_build_criterion_pml():
    pytest.importorskip("pytorch_metric_learning")
    crit = engine.build_criterion("pml:ProxyAnchorLoss", 5, 8)
    assert sum(p.numel() for p in crit.parameters()) == 5 * 8  # proxies, given num_classes/embedding_size
    loss = crit(torch.randn(6, 8), torch.tensor([0, 0, 1, 1, 2, 2]))
    assert math.isfinite(loss.item())
    with pytest.raises(ValueError, match="NoSuchLoss"):
        engine.build_criterion("pml:NoSuchLoss", 5, 8)


def test_resolve_device_and_amp():
    assert devices.resolve_device("cpu").type == "cpu"
    assert devices.resolve_amp("none", torch.device("cpu")) is None
    assert devices.resolve_amp("bf16", torch.device("cpu")) is None  # GPU only
    with pytest.raises(ValueError):
        devices.resolve_amp("int8", torch.device("cpu"))
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="no CUDA"):
            devices.resolve_device("cuda")


@pytest.mark.parametrize("arch", ["vgg19", "vgg19_bn"])
def test_width_one_is_torchvision_vgg19(arch):
    import torchvision

    ref = getattr(torchvision.models, arch)(weights=None).features
    net = EmbeddingNet(arch, 16, width=1.0)
    assert [(k, tuple(v.shape)) for k, v in net.trunk.state_dict().items()] == \
        [(k, tuple(v.shape)) for k, v in ref.state_dict().items()]
    assert net.head.in_features == 512


def test_width_quarter_divides_channels(tmp_path):
    import torchvision

    ref = torchvision.models.vgg19_bn(weights=None).features
    net = EmbeddingNet("vgg19_bn", 16, width=0.25)
    full = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    quarter = {k: tuple(v.shape) for k, v in net.trunk.state_dict().items()}
    assert list(full) == list(quarter)  # the same 19-layer topology, layer for layer
    convs = [m for m in net.trunk if isinstance(m, torch.nn.Conv2d)]
    ref_convs = [m for m in ref if isinstance(m, torch.nn.Conv2d)]
    assert len(convs) == 16
    for a, b in zip(convs, ref_convs):
        assert a.out_channels * 4 == b.out_channels
        assert a.in_channels == (3 if b.in_channels == 3 else b.in_channels // 4)
    assert net.head.in_features == 128 and net.features(torch.randn(2, 3, 32, 32)).shape == (2, 128)
    n_full = sum(p.numel() for p in ref.parameters())
    n_q = sum(p.numel() for p in net.trunk.parameters())
    assert 14 < n_full / n_q < 17  # ~ 1/16 of the weights
    path = str(tmp_path / "w.pth")
    torch.save(torchvision.models.vgg19_bn(weights=None).state_dict(), path)
    with pytest.raises(ValueError, match="--width 1"):
        EmbeddingNet("vgg19_bn", 16, width=0.25, weights=path)
    with pytest.raises(ValueError, match="width"):
        EmbeddingNet("vgg19_bn", 16, width=0)


def test_width_defaults_and_refusals(tmp_path):
    from daal_triton.train import cli

    cfg = cli.config_from_args(cli.build_parser().parse_args([]))
    assert cfg.width == 0.25 and cfg.dataset == "shapes"
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--dataset", "cub200"]))
    assert cfg.width == 1.0
    cfg = cli.config_from_args(cli.build_parser().parse_args(["--weights", "x.pth"]))
    assert cfg.width == 1.0
    with pytest.raises(config.ConfigError, match="--width 1"):
        config.validate_config(cli.config_from_args(
            cli.build_parser().parse_args(["--weights", "x.pth", "--width", "0.5"])), 1, torch.device("cpu"))
    with pytest.raises(config.ConfigError, match="--width 1"):
        config.validate_config(config.TrainConfig(weights="x.pth", width=0.5), 1, torch.device("cpu"))
    assert isinstance(engine.build_model(config.TrainConfig(embedding_dim=8)).trunk[0],
                      torch.nn.Conv2d)
    assert engine.build_model(config.TrainConfig(embedding_dim=8)).width == 0.25


def test_miner_feeds_the_loss():
    pytest.importorskip("pytorch_metric_learning")
    miner = engine.build_miner("pml:MultiSimilarityMiner", {"epsilon": 0.1})
    crit = engine.build_criterion("pml:MultiSimilarityLoss", 3, 8)
    seen = {}
    inner = crit.inner.forward

    def spy(emb, labels, indices_tuple=None, *a, **k):
        seen["tuple"] = indices_tuple
        return inner(emb, labels, indices_tuple, *a, **k)

    crit.inner.forward = spy
    loss_fn = engine.GlobalBatchLoss(miner=miner)
    emb = torch.randn(12, 8, requires_grad=True)
    labels = torch.arange(3).repeat_interleave(4)
    loss = loss_fn(crit, emb, labels)
    assert math.isfinite(loss.item()) and isinstance(seen["tuple"], tuple) and len(seen["tuple"]) == 4
    daal = engine.build_criterion("daal", 3, 8, backend="reference")
    assert math.isfinite(loss_fn(daal, emb, labels).item())  # DAAL takes the tuple as sample weights
    assert engine.build_miner(None) is None
    with pytest.raises(ValueError, match="no miner named"):
        engine.build_miner("pml:NoSuchMiner")
    with pytest.raises(ValueError, match="pml:"):
        engine.build_miner("MultiSimilarityMiner")


def _rates(opt, sched, steps: int) -> list:
    """The first group's learning rate at each of ``steps`` optimiser steps."""
    seen = []
    for _ in range(steps):
        seen.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    return seen


def test_schedule_stays_at_zero_past_its_end():
    """The cosine ends at 0 at total_steps and stays there (a step past the end, as a resumed run
    with fewer --epochs or a rounding step would take, never rises again)."""
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    seen = _rates(opt, engine.make_scheduler(opt, total_steps=4, warmup_steps=1), 12)
    assert seen[0] == pytest.approx(1.0) and seen[2] == pytest.approx(0.75) and seen[3] == pytest.approx(0.25)
    assert seen[4:] == [pytest.approx(0.0, abs=1e-12)] * 8, seen
