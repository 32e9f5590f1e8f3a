"""Command lines: ``daal-train`` (also ``python -m daal_triton.train``) and ``daal-eval``.

``daal-train`` with no arguments is the tuned main job: the embedded ``shapes`` set, a
quarter-width VGG-19-BN (``--width 0.25``), 12 epochs of DAAL, on a CPU in a few minutes, ending with a table of the trained network against the
untrained network and raw-pixel nearest neighbours (docs/training.md has the numbers).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time
from typing import Dict, List, Optional

from daal_triton.core import Hyperparameters

from .engine import DAAL_TRAIN_FIELDS, TrainConfig, default_daal
from .model import SMALL_DATASETS, SMALL_WIDTH, default_width

_D = TrainConfig()


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=_D.dataset, choices=["shapes", "digits", "cub200", "cars196", "sop", "folder"],
                   help="data set (default %(default)s: embedded, generated from --seed; digits: scikit-learn's "
                        "8x8 digits; cub200/cars196/sop/folder read --data-root)")
    p.add_argument("--data-root", default=_D.data_root,
                   help="folder holding the data set (cub200: CUB_200_2011/; cars196: cars_annos.mat + car_ims/ "
                        "or stanford_cars/; sop: Stanford_Online_Products/; folder: train/<class>/, test/<class>/)")
    p.add_argument("--image-size", type=int, default=_D.image_size,
                   help="input side in pixels (default %(default)s; 224 is usual for photos)")
    p.add_argument("--device", default=_D.device, help="auto (CUDA if available), cpu or cuda[:N] (default %(default)s)")
    p.add_argument("--amp", default=_D.amp, choices=["none", "bf16", "fp16"],
                   help="mixed precision on GPU (ignored on CPU; default %(default)s)")
    p.add_argument("--seed", type=int, default=_D.seed, help="seed of the data (shapes), model init and sampler")
    p.add_argument("--eval-batch-size", type=int, default=_D.eval_batch_size, help="batch size when embedding the test set")
    p.add_argument("--num-workers", type=int, default=_D.num_workers, help="DataLoader worker processes")
    p.add_argument("--knn-backend", default=_D.knn_backend, choices=["auto", "triton", "reference"],
                   help="daal_triton.knn backend for evaluation (auto: fused kernel on CUDA, PyTorch on CPU)")
    p.add_argument("--no-tsne", dest="tsne", action="store_false", help="skip the t-SNE plot")
    p.add_argument("--tsne-max-points", type=int, default=_D.tsne_max_points,
                   help="subsample the test set to this many points for t-SNE (default %(default)s)")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (torch.set_num_threads; default: PyTorch's choice, usually all cores)")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="daal-train",
        description="Train a VGG-19 embedding network with DAAL (or a pytorch-metric-learning loss) and evaluate "
                    "retrieval on held-out classes. With no arguments: the tuned CPU demo on the 'shapes' set.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    _add_common(p)
    p.add_argument("--epochs", type=int, default=_D.epochs, help="training epochs")
    p.add_argument("--steps-per-epoch", type=int, default=_D.steps_per_epoch,
                   help="cap on batches per epoch (for smoke runs); default: images // batch size")
    p.add_argument("--classes-per-batch", "-P", type=int, default=_D.classes_per_batch,
                   help="P: classes in each P x K batch")
    p.add_argument("--samples-per-class", "-K", type=int, default=_D.samples_per_class,
                   help="K: images of each class in a batch")
    p.add_argument("--arch", default=_D.arch, choices=["vgg19", "vgg19_bn"],
                   help="torchvision VGG-19 trunk; vgg19_bn (batch norm) is the default because plain vgg19 "
                        "does not train from scratch in the CPU budget (see docs/training.md)")
    p.add_argument("--width", type=float, default=None,
                   help=f"channel multiplier of the VGG-19 trunk (same 19-layer topology, channels x WIDTH; 1.0 = "
                        f"torchvision's VGG-19 exactly, required with --weights). Default: {SMALL_WIDTH} on "
                        f"{'/'.join(SMALL_DATASETS)} (the CPU main job), 1.0 on photo data sets and with --weights")
    p.add_argument("--embedding-dim", type=int, default=_D.embedding_dim, help="size of the linear embedding head")
    p.add_argument("--weights", default=_D.weights,
                   help="torchvision ImageNet state dict for the trunk (e.g. vgg19_bn-c79401a0.pth); never downloaded")
    p.add_argument("--loss", default=_D.loss, help="'daal', or 'pml:<LossName>' for any pytorch-metric-learning "
                                                   "loss, e.g. pml:ProxyAnchorLoss (needs the [pml] extra)")
    p.add_argument("--loss-kwargs", default="{}", help="JSON dict of extra keyword arguments for the loss")
    p.add_argument("--miner", default=None,
                   help="'pml:<MinerName>': a pytorch-metric-learning miner applied to each (gathered) batch; its "
                        "tuples go to the loss as indices_tuple, e.g. --loss pml:MultiSimilarityLoss "
                        "--miner pml:MultiSimilarityMiner")
    p.add_argument("--miner-kwargs", default="{}", help="JSON dict of keyword arguments for the miner")
    p.add_argument("--loss-backend", default=_D.loss_backend, choices=["auto", "triton", "reference"],
                   help="DAAL backend (auto: fused kernels on CUDA, PyTorch reference on CPU)")
    _add_daal_flags(p)
    p.add_argument("--lr", type=float, default=_D.lr, help="AdamW learning rate of the network")
    p.add_argument("--loss-lr", type=float, default=_D.loss_lr,
                   help="AdamW learning rate of the loss's parameters (DAAL segments, proxies)")
    p.add_argument("--weight-decay", type=float, default=_D.weight_decay, help="AdamW weight decay (network weights)")
    p.add_argument("--warmup-epochs", type=float, default=_D.warmup_epochs,
                   help="linear warm-up length before the cosine decay, in epochs (0: none)")
    p.add_argument("--augment", default=_D.augment, choices=["none", "shift", "crop"],
                   help="training augmentation of the in-memory sets (shapes, digits); photos always get random "
                        "resized crop + flip")
    p.add_argument("--shapes-train-per-class", type=int, default=_D.shapes_train_per_class,
                   help="shapes: training images per class")
    p.add_argument("--shapes-test-per-class", type=int, default=_D.shapes_test_per_class,
                   help="shapes: test images per class")
    p.add_argument("--shapes-nuisance", type=float, default=_D.shapes_nuisance,
                   help="shapes: strength of the nuisance factors (0 clean .. 1 default)")
    p.add_argument("--eval-every", type=int, default=_D.eval_every,
                   help="evaluate on the test classes every N epochs (and always after the last; 0: last only)")
    p.add_argument("--no-baselines", dest="baselines", action="store_false",
                   help="skip the raw-pixel and untrained-network baselines")
    p.add_argument("--resume", default=_D.resume, help="checkpoint to resume from (checkpoint_last.pt)")
    p.add_argument("--out", default=_D.out, help="output directory")
    p.add_argument("--memory-bank", type=int, default=_D.memory_bank, metavar="SIZE",
                   help="cross-batch memory: a FIFO of the last SIZE (global-batch) embeddings used, with the "
                        "batch, as the reference set of DAAL's kNN density; saved in checkpoints (0: off; "
                        "--loss daal only)")
    d = p.add_argument_group("distributed training (torchrun --nproc_per_node=N -m daal_triton.train ...)")
    d.add_argument("--dist-backend", default=_D.dist_backend, choices=["auto", "nccl", "gloo"],
                   help="torch.distributed backend when started by torchrun (auto: NCCL on GPUs, gloo on CPUs); "
                        "P must be divisible by the number of processes")
    d.add_argument("--dist-timeout", type=float, default=_D.dist_timeout, metavar="MIN",
                   help="process-group timeout in minutes (the other ranks wait this long for rank 0's evaluations)")
    d.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm: batch-norm statistics over the global batch instead of each rank's share "
                        "(CUDA only)")
    return p


def _add_daal_flags(p: argparse.ArgumentParser) -> None:
    """One ``--daal-<name>`` flag per field of :class:`daal_triton.Hyperparameters` (its help and
    default; the loss validates the values)."""
    g = p.add_argument_group("DAAL hyperparameters (docs/method.md; --loss daal)")
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    for name, default in default_daal().items():
        flag, help_text = f"--daal-{name.replace('_', '-')}", fields[name].metadata["help"]
        if isinstance(default, bool):
            g.add_argument(flag, dest=f"daal_{name}", action=argparse.BooleanOptionalAction, default=default,
                           help=help_text)
        else:
            g.add_argument(flag, dest=f"daal_{name}", type=type(default), default=default, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    kw = {}
    for name in ("loss_kwargs", "miner_kwargs"):
        try:
            kw[name] = json.loads(getattr(args, name))
        except json.JSONDecodeError as e:
            raise SystemExit(f"--{name.replace('_', '-')} is not valid JSON: {e}")
        if not isinstance(kw[name], dict):
            raise SystemExit(f"--{name.replace('_', '-')} must be a JSON object, got {getattr(args, name)!r}")
    if args.width is not None and args.weights and args.width != 1.0:
        raise SystemExit(f"daal-train: error: --weights needs --width 1 (ImageNet weights exist only for "
                         f"torchvision's full-width VGG-19), got --width {args.width}")
    if args.width is not None and not 0 < args.width <= 4:
        raise SystemExit(f"daal-train: error: --width must be in (0, 4], got {args.width}")
    width = default_width(args.dataset, args.weights) if args.width is None else args.width
    daal = {name: getattr(args, f"daal_{name}") for name in DAAL_TRAIN_FIELDS}
    fields = {k: v for k, v in vars(args).items() if not k.startswith("daal_") and k not in kw}
    return TrainConfig.from_dict(dict(fields, daal=daal, width=width, **kw))


def main(argv: Optional[List[str]] = None) -> int:
    """``daal-train``."""
    args = build_parser().parse_args(argv)
    cfg = config_from_args(args)
    _set_threads(args.threads)
    from .data import DatasetLayoutError
    from .ddp import ConfigError
    from .engine import run

    try:
        run(cfg)
    except (DatasetLayoutError, ConfigError) as e:
        print(f"daal-train: error: {e}", file=sys.stderr)
        return 2
    return 0


def _set_threads(n: Optional[int]) -> None:
    if n is not None:
        if n < 1:
            raise SystemExit(f"--threads must be >= 1, got {n}")
        import torch

        torch.set_num_threads(n)


def build_eval_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="daal-eval", description="Evaluate a daal-train checkpoint on the held-out classes of its data set "
                                      "(or of another one given with --dataset/--data-root).",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("checkpoint", help="checkpoint_last.pt or checkpoint_best.pt written by daal-train")
    p.add_argument("--out", default=None, help="where to write eval.json and tsne_eval.png (default: next to the checkpoint)")
    p.add_argument("--baselines", action="store_true", help="also evaluate raw pixels")
    _add_common(p)
    for a in p._actions:  # unset options keep the checkpoint's values
        if a.dest not in ("help", "checkpoint", "out", "baselines", "tsne", "progress"):
            a.default = None
    return p


def eval_main(argv: Optional[List[str]] = None) -> int:
    """``daal-eval CHECKPOINT``: embed the test set, print and save every metric, plot t-SNE."""
    from . import evaluate as E
    from . import plots
    from .data import DatasetLayoutError, build_datasets
    from .engine import build_model, load_checkpoint, resolve_amp, resolve_device

    args = build_eval_parser().parse_args(argv)
    _set_threads(args.threads)
    ck = load_checkpoint(args.checkpoint)
    cfg = TrainConfig.from_dict(dict({"width": 1.0}, **ck["config"]))  # checkpoints before --width: full width
    for k, v in vars(args).items():
        if v is not None and hasattr(cfg, k) and k not in ("out",):
            setattr(cfg, k, v)
    cfg.weights = None  # the checkpoint holds the trained trunk
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    os.makedirs(out, exist_ok=True)
    device = resolve_device(cfg.device)
    amp_dtype = resolve_amp(cfg.amp, device)
    try:
        _, test_ds = build_datasets(cfg.dataset, cfg.data_root, cfg.image_size, seed=cfg.seed, augment=cfg.augment,
                                    shapes_train_per_class=cfg.shapes_train_per_class,
                                    shapes_test_per_class=cfg.shapes_test_per_class,
                                    shapes_nuisance=cfg.shapes_nuisance)
    except DatasetLayoutError as e:
        print(f"daal-eval: error: {e}", file=sys.stderr)
        return 2
    model = build_model(cfg, announce=False)
    model.load_state_dict(ck["model"])
    model.to(device)
    t0 = time.time()
    emb = E.embed(model, test_ds, device, batch_size=cfg.eval_batch_size, amp_dtype=amp_dtype,
                  num_workers=cfg.num_workers, progress=args.progress)
    labels = E.dataset_labels(test_ds)
    rows: Dict[str, Dict[str, float]] = {}
    if args.baselines:
        rows["raw pixels"] = E.all_metrics(E.pixel_vectors(test_ds), labels, test_ds.modes,
                                           backend=cfg.knn_backend, seed=cfg.seed)
    rows[f"checkpoint (epoch {ck.get('epoch')})"] = E.all_metrics(emb.to(device), labels.to(device), test_ds.modes,
                                                                  backend=cfg.knn_backend, seed=cfg.seed)
    with open(os.path.join(out, "eval.json"), "w") as f:
        json.dump(dict(checkpoint=os.path.abspath(args.checkpoint), dataset=cfg.dataset, results=rows,
                       seconds=round(time.time() - t0, 2)), f, indent=2)
    if cfg.tsne:
        plots.tsne_plot(emb, labels.numpy(), os.path.join(out, "tsne_eval.png"), modes=test_ds.modes,
                        class_names=test_ds.class_names, mode_names=test_ds.mode_names,
                        max_points=cfg.tsne_max_points, seed=cfg.seed,
                        title=f"{cfg.dataset} test classes, {os.path.basename(args.checkpoint)}")
    keys = [f"recall@{k}" for k in E.RECALL_KS] + ["nmi", "map@r", "r_precision", "subcluster_nmi"]
    print(E.format_table(rows, [k for k in keys if any(k in r for r in rows.values())]))
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
