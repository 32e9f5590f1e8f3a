"""The training program's GPU path, checked on the CPU (issue 17): no host synchronisation inside
the step between log points, AMP / channels_last / loader defaults per device, ``--compile`` wiring,
the data-wait record, the embedding pass.

"The path CUDA takes" is emulated as tests/package/test_host_sync.py does: the loss's value checks
(on for CPU tensors, off for CUDA ones) are patched off, and AdamW is the fused implementation that
:func:`engine.make_optimizer` picks for CUDA parameters. A ``TorchDispatchMode`` counts every
operator that copies a device value to the host.
"""
import collections
import json
import types

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

import daal_triton
from daal_testing import patch_value_checks
from daal_triton.memory import MemoryBank
from daal_triton.train import cli, config, devices, engine
from daal_triton.train import evaluate as E
from daal_triton.train import run as R

SYNCING = ("aten._local_scalar_dense", "aten.is_nonzero", "aten.nonzero", "aten.item",
           "aten.equal", "aten.allclose")
CPU = torch.device("cpu")
P, K, D = 3, 2, 8


class Trace(TorchDispatchMode):
    """The order of events: ``"batch"`` when the loop takes a batch, the op's name for each host sync."""

    def __init__(self):
        super().__init__()
        self.events = []
        self.ops = collections.Counter()

    def __torch_dispatch__(self, func, types_, args=(), kwargs=None):
        name = str(func.overloadpacket)
        self.ops[name] += 1
        if name in SYNCING:
            self.events.append(name)
        return func(*args, **(kwargs or {}))


class MarkedLoader:
    """A list of batches that writes ``"batch"`` into ``trace`` each time one is taken."""

    def __init__(self, batches, trace=None):
        self.batches, self.trace = batches, trace

    def __len__(self):
        return len(self.batches)

    def __iter__(self):
        for b in self.batches:
            if self.trace is not None:
                self.trace.events.append("batch")
            yield b


def tiny_net() -> nn.Module:
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                         nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, D))


def batches(n: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(P).repeat_interleave(K)
    return [(torch.randn(P * K, 3, 8, 8, generator=g), labels.clone()) for _ in range(n)]


@pytest.fixture
def gpu_defaults(monkeypatch):
    """The value checks (the loss's, the memory bank's) as on a CUDA tensor with the default
    options: off."""
    patch_value_checks(monkeypatch, lambda device, check_values=None: False)


def setup_step(bank: bool = False, steps: int = 7):
    torch.manual_seed(0)
    model = tiny_net()
    crit = daal_triton.DAALLoss(P, D, backend="reference")
    opt = engine.make_optimizer(model, crit, lr=1e-3, loss_lr=5e-3, weight_decay=1e-4, fused=True)  # as on CUDA
    sched = engine.make_scheduler(opt, 10 * steps, steps)
    loss_fn = engine.GlobalBatchLoss(MemoryBank(32, D) if bank else None)
    return model, crit, opt, sched, loss_fn


@pytest.mark.parametrize("steps,log_every", [(7, 3), (6, 3), (5, 50)])
@pytest.mark.parametrize("bank", [False, True], ids=["batch", "memory_bank"])
def test_step_reads_the_loss_only_at_log_points(gpu_defaults, steps, log_every, bank):
    """Between two log points the step performs no host synchronisation; each log point (every
    ``log_every`` steps, and the end of the epoch if it is not one) reads the running loss once."""
    model, crit, opt, sched, loss_fn = setup_step(bank, steps)
    kw = dict(loss_fn=loss_fn, log_every=log_every, progress=True)
    engine.train_one_epoch(model, crit, MarkedLoader(batches(2, seed=1)), opt, sched, CPU, **kw)  # warm-up
    with Trace() as trace:
        loss = engine.train_one_epoch(model, crit, MarkedLoader(batches(steps), trace), opt, sched, CPU, **kw)
    expected = []
    for i in range(1, steps + 1):
        expected.append("batch")
        if i % log_every == 0 or i == steps:
            expected.append("aten._local_scalar_dense")
    assert trace.events == expected
    assert loss == loss and abs(loss) < 1e6


def test_the_default_step_syncs_without_the_gpu_emulation():
    """The counter sees what the CPU path does read (the loss's value checks): without the
    emulation the same epoch is not sync-free, so the test above measures something."""
    model, crit, opt, sched, loss_fn = setup_step()
    with Trace() as trace:
        engine.train_one_epoch(model, crit, batches(3), opt, sched, CPU, loss_fn=loss_fn, log_every=50,
                               progress=False)
    assert len(trace.events) > 1


def test_the_mean_loss_is_the_float64_sum_of_the_step_losses():
    """Summed on the device in float64: the same number the host's ``sum(loss.item())`` gave
    before, bit for bit (the CPU run's metrics.jsonl stay identical)."""
    model, crit, opt, sched, _ = setup_step()
    seen = []

    def loss_fn(c, emb, labels):
        out = engine.loss_from_embeddings(c, emb, labels)
        seen.append(out.item())
        return out

    mean = engine.train_one_epoch(model, crit, batches(7), opt, sched, CPU, loss_fn=loss_fn, log_every=3,
                                  progress=False)
    total = 0.0
    for v in seen:
        total += v
    assert mean == total / 7


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_a_non_finite_loss_stops_the_epoch_at_the_next_read(gpu_defaults, bad):
    """NaN and +inf alike (``+ inf`` keeps the gradients finite: the sum stays inf, not NaN, so
    a check for NaN alone would train on)."""
    model, crit, opt, sched, _ = setup_step()
    calls = []

    def loss_fn(c, emb, labels):
        calls.append(1)
        out = engine.loss_from_embeddings(c, emb, labels)
        if len(calls) != 2:
            return out
        return out * float("nan") if bad == "nan" else out + float("inf")

    with pytest.raises(FloatingPointError, match=f"the loss became {bad} .*between step 0 and step 2"):
        engine.train_one_epoch(model, crit, batches(6), opt, sched, CPU, loss_fn=loss_fn, log_every=3,
                               progress=False)
    assert len(calls) == 3


def test_data_wait_is_timed_apart():
    model, crit, opt, sched, loss_fn = setup_step()
    stats = {}
    engine.train_one_epoch(model, crit, batches(4), opt, sched, CPU, loss_fn=loss_fn, progress=False,
                           max_steps=3, stats=stats)
    assert stats["steps"] == 3 and stats["images"] == 3 * P * K and stats["data_wait_s"] >= 0.0


# ----------------------------------------------------------------------------- device defaults

def test_amp_auto_is_bf16_on_cuda_float32_on_cpu(monkeypatch):
    cuda = torch.device("cuda")
    assert devices.resolve_amp("auto", CPU) is None
    assert devices.resolve_amp("none", cuda) is None
    asked = []

    def capability(device=None):
        asked.append(device)
        return {0: (7, 5), 1: (8, 0)}[torch.device(device).index or 0]

    # the run's GPU's own hardware (is_bf16_supported() asks the current device, and says True on
    # a T4 or V100, where bfloat16 is only emulated)
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    monkeypatch.setattr(torch.cuda, "get_device_capability", capability)
    assert devices.resolve_amp("auto", torch.device("cuda", 1)) is torch.bfloat16
    assert devices.resolve_amp("fp16", cuda) is torch.float16
    notes = []
    assert devices.resolve_amp("auto", cuda, notes.append) is None and "sm_75) has no bfloat16" in notes[0]
    assert asked == [torch.device("cuda", 1), cuda]
    args = cli.build_parser().parse_args([])
    assert args.amp == "auto" and args.channels_last is None and args.num_workers is None
    assert not args.compile and args.log_every == engine.LOG_EVERY
    args = cli.build_parser().parse_args(["--no-amp", "--no-channels-last", "--compile", "--log-every", "5"])
    assert (args.amp, args.channels_last, args.compile, args.log_every) == ("none", False, True, 5)


def test_amp_auto_on_cpu_says_nothing():
    notes = []
    assert devices.resolve_amp("auto", CPU, notes.append) is None and notes == []
    devices.resolve_amp("bf16", CPU, notes.append)
    assert notes and "float32" in notes[0]


def test_loader_defaults_per_device(monkeypatch):
    monkeypatch.setattr(devices, "available_cpus", lambda: 16)
    assert devices.loader_options(None, CPU) == dict(num_workers=0, pin_memory=False)
    cuda = torch.device("cuda")
    assert devices.loader_options(None, cuda) == dict(num_workers=8, pin_memory=True, persistent_workers=True,
                                                      prefetch_factor=4)
    assert devices.loader_options(0, cuda) == dict(num_workers=0, pin_memory=True)
    assert devices.loader_options(2, CPU, persistent=False)["persistent_workers"] is False
    monkeypatch.setattr(devices, "available_cpus", lambda: 3)
    assert devices.loader_options(None, cuda)["num_workers"] == 3
    # torchrun's processes of one machine share its CPUs: 8 GPUs on 32 cores, 4 workers each
    monkeypatch.setattr(devices, "available_cpus", lambda: 32)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "8")
    assert devices.loader_options(None, cuda)["num_workers"] == 4
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "64")
    assert devices.loader_options(None, cuda)["num_workers"] == 1
    assert devices.loader_options(None, CPU)["num_workers"] == 0


def test_channels_last_on_cuda_only_by_default():
    assert devices.use_channels_last(None, torch.device("cuda")) is True
    assert devices.use_channels_last(None, CPU) is False
    plain = devices.place_model(tiny_net(), CPU)
    assert devices.input_memory_format(plain) is torch.contiguous_format
    nhwc = devices.place_model(tiny_net(), CPU, channels_last=True)
    assert nhwc[0].weight.is_contiguous(memory_format=torch.channels_last)
    assert devices.input_memory_format(nhwc) is torch.channels_last


def test_channels_last_network_gets_channels_last_images_and_the_same_numbers():
    torch.manual_seed(0)
    a = tiny_net()
    b = devices.place_model(tiny_net(), CPU, channels_last=True)
    b.load_state_dict(a.state_dict())
    seen = []
    b[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].is_contiguous(memory_format=torch.channels_last)))
    crit = daal_triton.DAALLoss(P, D, backend="reference")
    opt = engine.make_optimizer(b, crit, lr=1e-3, loss_lr=5e-3, weight_decay=1e-4, fused=True)
    engine.train_one_epoch(b, crit, batches(2), opt, None, CPU, progress=False)
    assert seen == [True, True]
    ds = torch.utils.data.TensorDataset(torch.randn(10, 3, 8, 8), torch.zeros(10, dtype=torch.long))
    b.load_state_dict(a.state_dict())
    ea, eb = E.embed(a, ds, CPU, batch_size=4), E.embed(b, ds, CPU, batch_size=4, num_workers=None)
    assert eb.device.type == "cpu" and eb.dtype == torch.float32 and eb.shape == (10, D)
    torch.testing.assert_close(ea, eb, atol=1e-5, rtol=1e-5)
    assert seen[-1] is True


def test_fused_adamw_on_cuda_params_only():
    crit = daal_triton.DAALLoss(P, D, backend="reference")
    opt = engine.make_optimizer(tiny_net(), crit, lr=1e-3, loss_lr=5e-3, weight_decay=1e-4)
    assert not opt.defaults.get("fused")  # CPU: the default implementation (and its numbers)
    opt = engine.make_optimizer(tiny_net(), crit, lr=1e-3, loss_lr=5e-3, weight_decay=1e-4, fused=True)
    assert opt.defaults["fused"] and [len(g["params"]) for g in opt.param_groups] == [2, 4, 1]


# ----------------------------------------------------------------------------- --compile and the run

def test_compile_wraps_the_network_only(monkeypatch):
    compiled = []

    def fake_compile(net, *a, **k):
        compiled.append(net)
        return net

    monkeypatch.setattr(torch, "compile", fake_compile)
    model, crit = tiny_net(), daal_triton.DAALLoss(P, D, backend="reference")
    state = types.SimpleNamespace(cfg=types.SimpleNamespace(compile=True, sync_bn=False),
                                  ctx=types.SimpleNamespace(distributed=False, is_main=True), model=model,
                                  criterion=crit, bank=None, miner=None, log=print, net=None, loss_fn=None)
    R.distribute(state)
    assert compiled == [model] and state.model is model
    state.cfg.compile = False
    compiled.clear()
    R.distribute(state)
    assert compiled == [] and state.net is model


def test_compile_without_a_compiler_is_one_error_line(tmp_path, monkeypatch, error_line):
    monkeypatch.setattr(devices.shutil, "which", lambda name: None)
    monkeypatch.delenv("CXX", raising=False)
    assert cli.main(["--device", "cpu", "--compile", "--out", str(tmp_path / "r")]) == 2
    assert "--compile on the CPU needs a C++ compiler" in error_line("daal-train")
    assert not (tmp_path / "r").exists()


def test_a_compiled_run_records_data_wait_and_speed(tmp_path, monkeypatch):
    """The whole program with --compile (torch.compile replaced by its eager backend: inductor on
    the CPU is too slow for a test) writes data_wait_s and train_images_per_s per epoch."""
    real = torch.compile
    calls = []

    def eager_compile(net, *a, **k):
        calls.append(type(net).__name__)
        return real(net, backend="eager")

    monkeypatch.setattr(torch, "compile", eager_compile)
    monkeypatch.setattr(config, "check_compile", lambda device: None)  # no C++ compiler needed
    out = tmp_path / "run"
    flags = ["--device", "cpu", "--image-size", "32", "--shapes-train-per-class", "4", "--shapes-test-per-class", "4",
             "-P", "4", "-K", "2", "--steps-per-epoch", "2", "--epochs", "2", "--embedding-dim", "8",
             "--eval-every", "2", "--no-progress", "--no-tsne", "--no-baselines", "--save", "none", "--compile",
             "--log-every", "1", "--out", str(out)]
    assert cli.main(flags) == 0
    assert calls == ["EmbeddingNet"]
    recs = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    trained = [r for r in recs if r["model"] == "trained"]
    assert [r["epoch"] for r in trained] == [1, 2]
    for r in trained:
        assert r["data_wait_s"] >= 0 and r["train_images_per_s"] > 0
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["compile"] is True and cfg["amp"] == "auto" and cfg["num_workers"] is None
