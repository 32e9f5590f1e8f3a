"""Issue 14 diagnostic (not part of the package; docs/results/shapes_tuning.md, round E):
train exactly as daal-train does (same build_run, same train_one_epoch), and at evaluation epochs evaluate the live network plus weight averages:
EMA (per step, parameters and BN buffers averaged) at several decays, and uniform averages
of the epoch-end weights of the last N epochs (BN statistics recomputed on the training set).
Training is untouched, so the live numbers are those of the plain run."""
import copy, json, sys, time
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn, update_bn
from daal_triton.train.cli import build_parser, config_from_args, _set_threads
from daal_triton.train import run as R, evaluate as E
from daal_triton.train.engine import train_one_epoch
from daal_triton.train.log import Log
from daal_triton.train import ddp

argv = sys.argv[1:]
args = build_parser().parse_args(argv)
cfg = config_from_args(args)
_set_threads(args.threads)
import os
os.makedirs(cfg.out, exist_ok=True)
device = torch.device("cpu")
ctx, device = ddp.setup(device, "auto", 60.0)
state = R.build_run(cfg, ctx, device, Log("probe"), time.time(), time.process_time())
R.distribute(state)
model = state.model
DECAYS = (0.99, 0.995, 0.998)
emas = {d: AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(d), use_buffers=True) for d in DECAYS}

class Sched:
    def __init__(self, s): self.s = s
    def step(self):
        self.s.step()
        with torch.no_grad():
            for m in emas.values(): m.update_parameters(model)

sched = Sched(state.scheduler)
snaps = []  # epoch-end state dicts
bn_loader = torch.utils.data.DataLoader(state.train_ds, batch_size=48, shuffle=False)
labels = E.dataset_labels(state.test_ds)
out = open(os.path.join(cfg.out, "probe.jsonl"), "w")

def ev(net, epoch, name):
    emb = E.embed(net, state.test_ds, device, batch_size=cfg.eval_batch_size, num_workers=0)
    m = E.all_metrics(emb, labels, state.test_ds.modes, seed=cfg.seed)
    rec = dict(epoch=epoch, model=name, **{k: round(v, 4) for k, v in m.items()})
    out.write(json.dumps(rec) + "\n"); out.flush()
    return rec

class Wrap(torch.nn.Module):  # AveragedModel.module has .features; embed calls model(images)
    pass

for epoch in range(1, cfg.epochs + 1):
    state.sampler.set_epoch(epoch)
    t0 = time.time()
    loss = train_one_epoch(state.net, state.criterion, state.loader, state.optimizer, sched, device,
                           max_steps=state.steps, progress=False, loss_fn=state.loss_fn)
    tt = time.time() - t0
    snaps.append(copy.deepcopy(model.state_dict()))
    snaps = snaps[-10:]
    if epoch % cfg.eval_every == 0 or epoch == cfg.epochs:
        t1 = time.time()
        line = [f"ep {epoch} loss {loss:.4f} ({tt:.1f}s)"]
        r = ev(model, epoch, "live"); line.append(f"live {r['recall@1']:.3f}")
        for d, m in emas.items():
            r = ev(m.module, epoch, f"ema{d}"); line.append(f"ema{d} {r['recall@1']:.3f}")
        if epoch == cfg.epochs:
            for n in (3, 5, 10):
                avg = copy.deepcopy(model)
                sd = {k: (sum(s[k].double() for s in snaps[-n:]) / n).to(v.dtype) if v.is_floating_point() else v
                      for k, v in snaps[-1].items()}
                avg.load_state_dict(sd)
                r = ev(avg, epoch, f"swa{n}_bnavg"); line.append(f"swa{n}(bn avg) {r['recall@1']:.3f}")
                update_bn(bn_loader, avg)
                r = ev(avg, epoch, f"swa{n}_bnfix"); line.append(f"swa{n}(bn recomputed) {r['recall@1']:.3f}")
            for d, m in emas.items():
                e2 = copy.deepcopy(m.module); update_bn(bn_loader, e2)
                r = ev(e2, epoch, f"ema{d}_bnfix"); line.append(f"ema{d}(bn recomputed) {r['recall@1']:.3f}")
        print("  ".join(line) + f"  [eval {time.time() - t1:.1f}s]", flush=True)
