"""Command lines: ``daal-train`` (also ``python -m daal_triton.train``) and ``daal-eval``.

``daal-train`` with no arguments is the tuned main job: the embedded ``shapes`` set, a
quarter-width VGG-19-BN (``--width 0.25``), 20 epochs of DAAL, on a CPU in a few minutes, ending with a table of the trained network against the
untrained network and raw-pixel nearest neighbours (docs/training.md has the numbers).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import re
import sys
import time
from typing import Any, Dict, List, Optional

from daal_triton.core import Hyperparameters

from .config import CHOICES, DAAL_TRAIN_FIELDS, TrainConfig, default_daal
from .console import stop_name
from .files import folder_in_use, is_special, loads_json, nan_to_null, os_message, special_text
from .model import SMALL_DATASETS, SMALL_WIDTH, default_width

_D = TrainConfig()


class UsageError(ValueError):
    """A command line argparse cannot parse (printed as one ``error:`` line, exit status 2)."""


class _Parser(argparse.ArgumentParser):
    """argparse, but a bad command line is one ``<prog>: error: ...`` line (no usage block) that
    :func:`main` / :func:`eval_main` print and answer with exit status 2. A value such as ``-1e-3``
    or ``-inf`` is a negative number, not a flag (Python 3.11's argparse knew only ``-1`` and ``-.5``:
    ``--lr -1e-3`` was "expected one argument")."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        digits = r"\d[\d_]*"  # 1_000: as float() and newer argparse read it
        self._negative_number_matcher = re.compile(
            rf"^-({digits}\.?[\d_]*|\.{digits})([eE][-+]?{digits})?$|^-(inf|infinity|nan)$", re.I)

    def error(self, message: str):  # type: ignore[override]
        raise UsageError(f"{message} (see {self.prog} --help)")


def given_flags(parser: argparse.ArgumentParser, argv: Optional[List[str]]) -> set:
    """The :class:`TrainConfig` fields set explicitly on the command line ``argv`` (``daal.<name>``
    for ``--daal-<name>``): ``argv`` parsed again with every default suppressed, so a flag given
    with its default value still counts as given."""
    saved = [(a, a.default) for a in parser._actions]
    try:
        for a, _ in saved:
            if a.dest != "help":
                a.default = argparse.SUPPRESS
        ns = parser.parse_args(argv)
    finally:
        for a, default in saved:
            a.default = default
    fields = {f.name for f in dataclasses.fields(TrainConfig)}  # not --config, --threads: no setting of the run
    return {f"daal.{k[5:]}" if k.startswith("daal_") else k for k in vars(ns) if k in fields or k.startswith("daal_")}


class _HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """``(default: X)`` after a flag's help, except where it would mislead: on-off switches (their
    help says what they do) and values with no default (the help says what happens then)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.nargs == 0 or action.default is None:
            # Python 3.9's BooleanOptionalAction adds the default to the help itself (3.10 dropped it)
            return (action.help or "").replace(" (default: %(default)s)", "")
        return super()._get_help_string(action) or ""


def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dataset", default=_D.dataset, choices=CHOICES["dataset"],
                   help="data set (shapes: embedded, generated from --data-seed; digits: scikit-learn's "
                        "8x8 digits; cub200/cars196/sop/folder read --data-root)")
    p.add_argument("--data-root", default=_D.data_root,
                   help="folder holding the data set (cub200: CUB_200_2011/; cars196: cars_annos.mat + car_ims/ "
                        "or stanford_cars/; sop: Stanford_Online_Products/; folder: train/<class>/, test/<class>/)")
    p.add_argument("--image-size", type=int, default=_D.image_size,
                   help="input side in pixels, at least 32 (224 is usual for photos)")
    p.add_argument("--device", default=_D.device, help="auto (CUDA if available), cpu or cuda[:N]")
    p.add_argument("--amp", default=_D.amp, choices=CHOICES["amp"],
                   help="autocast of the network on GPU: auto = bf16 on CUDA, float32 on CPU; fp16 adds a "
                        "gradient scaler; the loss always computes in float32")
    p.add_argument("--no-amp", dest="amp", action="store_const", const="none",
                   help="float32 everywhere (= --amp none)")
    p.add_argument("--channels-last", dest="channels_last", action=argparse.BooleanOptionalAction,
                   default=_D.channels_last,
                   help="network weights and input images in channels_last (NHWC) memory layout "
                        "(default: on CUDA, off on CPU)")
    p.add_argument("--seed", type=int, default=_D.seed, help="seed of the model's initialisation and the sampler")
    p.add_argument("--data-seed", type=int, default=_D.data_seed,
                   help="seed that draws the shapes set (fixed by default: runs with different --seed train on "
                        "the same data and are evaluated on the same held-out images)")
    p.add_argument("--eval-batch-size", type=int, default=_D.eval_batch_size, help="batch size when embedding the test set")
    p.add_argument("--num-workers", type=int, default=_D.num_workers,
                   help="DataLoader worker processes (default: min(8, CPUs / LOCAL_WORLD_SIZE) on CUDA, the "
                        "machine's CPUs shared among torchrun's processes, with pinned memory and prefetching; "
                        "0 on CPU)")
    p.add_argument("--knn-backend", default=_D.knn_backend, choices=CHOICES["knn_backend"],
                   help="daal_triton.knn backend for evaluation (auto: fused kernel on CUDA, PyTorch on CPU)")
    p.add_argument("--no-tsne", dest="tsne", action="store_false", help="skip the t-SNE plot")
    p.add_argument("--tsne-max-points", type=int, default=_D.tsne_max_points,
                   help="subsample the test set to this many points for t-SNE")
    p.add_argument("--nmi", default=_D.nmi, choices=CHOICES["nmi"],
                   help="NMI's k-means (scikit-learn, on the CPU, with as many clusters as test classes): auto "
                        "leaves it out, with a note, where test images x classes x D exceeds 1e10 (SOP: days per "
                        "evaluation); on: always; off: never")
    p.add_argument("--no-progress", dest="progress", action="store_false", help="no tqdm progress bars")
    p.add_argument("--threads", type=int, default=None,
                   help="CPU threads for PyTorch (torch.set_num_threads; default: PyTorch's choice, usually all cores)")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="daal-train",
        description="Train a VGG-19 embedding network with DAAL (or a pytorch-metric-learning loss) and evaluate "
                    "retrieval on held-out classes. With no arguments: the tuned CPU demo on the 'shapes' set.",
        formatter_class=_HelpFormatter)
    _add_common(p)
    p.add_argument("--epochs", type=int, default=_D.epochs, help="training epochs")
    p.add_argument("--steps-per-epoch", type=int, default=_D.steps_per_epoch,
                   help="cap on batches per epoch (for smoke runs); default: images // batch size")
    p.add_argument("--classes-per-batch", "-P", type=int, default=_D.classes_per_batch,
                   help="P: classes in each P x K batch")
    p.add_argument("--samples-per-class", "-K", type=int, default=_D.samples_per_class,
                   help="K: images of each class in a batch")
    p.add_argument("--arch", default=_D.arch, choices=CHOICES["arch"],
                   help="torchvision VGG-19 trunk; vgg19_bn (batch norm) is the default because plain vgg19 "
                        "does not train from scratch in the CPU budget (see docs/training.md)")
    p.add_argument("--width", type=float, default=None,
                   help=f"channel multiplier of the VGG-19 trunk, in (0, 4] (same 19-layer topology, channels x "
                        f"WIDTH; 1.0 = torchvision's VGG-19 exactly, required with --weights). Default: "
                        f"{SMALL_WIDTH} on {'/'.join(SMALL_DATASETS)} (the CPU main job), 1.0 on photo data sets and "
                        f"with --weights")
    _add_model_flags(p)
    _add_daal_flags(p)
    p.add_argument("--lr", type=float, default=_D.lr, help="AdamW learning rate of the network")
    p.add_argument("--loss-lr", type=float, default=_D.loss_lr,
                   help="AdamW learning rate of the loss's parameters (DAAL segments, proxies)")
    p.add_argument("--weight-decay", type=float, default=_D.weight_decay, help="AdamW weight decay (network weights)")
    p.add_argument("--warmup-epochs", type=float, default=_D.warmup_epochs,
                   help="linear warm-up length before the cosine decay, in epochs (0: none)")
    p.add_argument("--augment", default=_D.augment, choices=CHOICES["augment"],
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
    p.add_argument("--compile", action="store_true",
                   help="torch.compile the embedding network (default mode; the first steps compile; needs "
                        "Triton on CUDA, a C++ compiler on CPU)")
    p.add_argument("--log-every", type=int, default=_D.log_every, metavar="N",
                   help="read the running training loss back from the device every N steps (progress bar, "
                        "finite check) and at the end of the epoch; in between the step never waits for the GPU")
    _add_output_flags(p)
    p.add_argument("--memory-bank", type=int, default=_D.memory_bank, metavar="SIZE",
                   help="cross-batch memory: a FIFO of the last SIZE (global-batch) embeddings used, with the "
                        "batch, as the reference set of DAAL's kNN density; saved in checkpoints (0: off; "
                        "--loss daal only)")
    _add_dist_flags(p)
    return p


def _add_model_flags(p: argparse.ArgumentParser) -> None:
    """The embedding head, ImageNet weights, the loss and the miner."""
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
    p.add_argument("--loss-backend", default=_D.loss_backend, choices=CHOICES["loss_backend"],
                   help="DAAL backend (auto: fused kernels on CUDA, PyTorch reference on CPU)")


def _add_output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resume", default=_D.resume,
                   help="continue the run of this checkpoint_last.pt (checkpoint_best.pt holds no optimiser and is "
                        "refused), with its configuration: a flag given here overrides it if it may change mid-run "
                        "(epochs, learning rates, warm-up, evaluation, outputs, devices) and is refused if it would "
                        "change the data, network or loss; config.json records the changes (docs/training.md)")
    p.add_argument("--stop-after", type=int, default=_D.stop_after, metavar="EPOCH",
                   help="stop after this epoch (checkpoint_last.pt written), keeping the --epochs schedule: "
                        "--resume then continues exactly as if the run had not stopped")
    p.add_argument("--config", default=None, metavar="FILE",
                   help="rerun the configuration in FILE (a run's config.json) as a new run; flags given here "
                        "override it")
    p.add_argument("--out", default=_D.out,
                   help="output directory; one run per folder: a folder that holds files is refused unless "
                        "--resume continues the run there or --overwrite replaces it")
    p.add_argument("--overwrite", action="store_true",
                   help="replace the run in a non-empty --out: its checkpoints, metrics and plots are set aside "
                        "in --out/.daal-replaced, put back if the new run stops before its first checkpoint_last.pt, "
                        "removed when it finishes; other files stay")
    p.add_argument("--save", default=_D.save, choices=CHOICES["save"],
                   help="checkpoints to write: checkpoint_last.pt (every epoch; what --resume needs: with "
                        "the optimiser, about 3x the network), checkpoint_best.pt (the network and loss at "
                        "the best held-out Recall@1), both, or none")


def _add_dist_flags(p: argparse.ArgumentParser) -> None:
    d = p.add_argument_group("distributed training (torchrun --nproc_per_node=N -m daal_triton.train ...)")
    d.add_argument("--dist-backend", default=_D.dist_backend, choices=CHOICES["dist_backend"],
                   help="torch.distributed backend when started by torchrun (auto: NCCL on GPUs, gloo on CPUs); "
                        "P must be divisible by the number of processes")
    d.add_argument("--dist-timeout", type=float, default=_D.dist_timeout, metavar="MIN",
                   help="process-group timeout in minutes (the other ranks wait this long for rank 0's evaluations)")
    d.add_argument("--sync-bn", action="store_true",
                   help="SyncBatchNorm: batch-norm statistics over the global batch instead of each rank's share "
                        "(CUDA only)")


def _add_daal_flags(p: argparse.ArgumentParser) -> None:
    """One ``--daal-<name>`` flag per field of :class:`daal_triton.Hyperparameters` (its help and
    default; the loss validates the values)."""
    g = p.add_argument_group("DAAL hyperparameters (docs/method.md; --loss daal)")
    fields = {f.name: f for f in dataclasses.fields(Hyperparameters)}
    for name, default in default_daal().items():
        flag, help_text = f"--daal-{name.replace('_', '-')}", fields[name].metadata["help"]
        if isinstance(default, bool):
            g.add_argument(flag, dest=f"daal_{name}", action=argparse.BooleanOptionalAction, default=default,
                           help=f"{help_text} ({'on' if default else 'off'} by default)")
        else:
            g.add_argument(flag, dest=f"daal_{name}", type=type(default), default=default, help=help_text)


def config_from_args(args: argparse.Namespace) -> TrainConfig:
    from .ddp import ConfigError

    kw = {}
    for name in ("loss_kwargs", "miner_kwargs"):
        flag = f"--{name.replace('_', '-')}"
        try:
            kw[name] = loads_json(getattr(args, name))
        except ValueError as e:
            raise ConfigError(f"{flag} is not valid JSON: {e}") from None
        if not isinstance(kw[name], dict):
            raise ConfigError(f"{flag} must be a JSON object, got {getattr(args, name)!r}")
    daal = {name: getattr(args, f"daal_{name}") for name in DAAL_TRAIN_FIELDS}
    fields = {k: v for k, v in vars(args).items() if not k.startswith("daal_") and k not in kw}
    width = default_width(args.dataset, args.weights) if args.width is None else args.width
    for name in ("data_root", "weights"):  # recorded absolute: daal-eval and --resume may run from elsewhere
        if fields.get(name):
            fields[name] = os.path.abspath(fields[name])
    return TrainConfig.from_dict(dict(fields, daal=daal, width=width, **kw))


def main(argv: Optional[List[str]] = None) -> int:
    """``daal-train``."""
    from .checkpoint import CheckpointError
    from .config import check_choices, config_file
    from .data import DatasetLayoutError
    from .ddp import ConfigError
    from .run import Diverged, WriteFailed, run

    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    threads = _threads()
    try:
        args = parser.parse_args(argv)
        given = given_flags(parser, argv)
        cfg = config_from_args(args)
        _set_threads(args.threads)
        if args.config is not None:
            if cfg.resume:
                raise ConfigError("--config starts a new run from a config.json, --resume continues a checkpoint's "
                                  "run (with the checkpoint's configuration): give one of them")
            cfg = config_file(args.config, cfg, given)
            check_choices(cfg, f"--config {args.config}")  # what argparse checks on the command line
        daal_flags = sorted(name for name in given if name.startswith("daal."))
        if daal_flags and not cfg.resume and cfg.loss != "daal":  # recorded, then read as a change of the loss
            flag = "--daal-" + daal_flags[0][5:].replace("_", "-")
            raise ConfigError(f"{flag} sets a DAAL hyperparameter, but --loss is {cfg.loss}: it would do nothing "
                              f"(that loss's settings go in --loss-kwargs)")
        run(cfg, given=given)
    except (UsageError, DatasetLayoutError, ConfigError, CheckpointError) as e:
        print(f"daal-train: error: {_rank()}{_message(e)}", file=sys.stderr)
        return 2
    except (Diverged, WriteFailed) as e:  # the run started and stopped: not a usage error (exit status 1)
        print(f"daal-train: error: {_rank()}{e}", file=sys.stderr)
        return 1
    except OSError as e:  # the file system refused (a full disk, a folder that cannot be created)
        print(f"daal-train: error: {_rank()}{os_message(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError, ValueError) as e:  # sizes the machine cannot hold (--embedding-dim 1e9)
        # this rank's own out of memory; else, under torchrun, a collective whose peer had stopped
        message = memory_message(e) if out_of_memory(e) else _peer_stopped(e)
        if not message:
            raise
        print(f"daal-train: error: {_rank()}{message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:  # run.Interrupted says how to go on
        print(f"daal-train: {_rank()}{str(e) or f'interrupted ({stop_name()}) before the run started: nothing was written'}",
              file=sys.stderr)
        return 130
    finally:
        _threads(threads)
    return 0


#: What gloo and NCCL say in a rank whose peer process has gone (it stopped on an error of its own);
#: any other collective error (NCCL's own out of memory, an invalid usage: a bug) stays a traceback
PEER_GONE = ("Connection closed by peer", "Connection reset by peer", "Broken pipe", "communicator was aborted",
             "remote process exited")


def _peer_stopped(e: BaseException) -> Optional[str]:
    """Under torchrun, the line for a collective that failed because another rank stopped (a user
    error there, printed by that rank): a ~40-line gloo traceback here before (a distributed
    probe, 2026-12-07). None otherwise."""
    if not _rank() or not any(s in str(e) for s in PEER_GONE):
        return None
    last = (str(e).strip().splitlines() or [""])[-1][:200]
    return (f"another process of the run stopped, so this one cannot go on (that process's "
            f"error is above, or in torchrun's report; {type(e).__name__}: {last})")


def _rank() -> str:
    """``"rank R/W: "`` under torchrun with two or more processes, else ``""``: what starts this
    process's error line, so the one that failed first is told from the others (each rank prints
    its own: a run that diverged says so on every rank, and a peer's "cannot go on" follows)."""
    try:
        world, rank = int(os.environ.get("WORLD_SIZE", "1")), int(os.environ.get("RANK", "0"))
    except ValueError:
        return ""
    return f"rank {rank}/{world}: " if world >= 2 else ""


def _message(e: Exception) -> str:
    """The text of an error to print after ``error:``; one raised in a DataLoader worker process
    comes back with the worker's traceback in its message, of which only the last line is the error."""
    text = str(e)
    if "Original Traceback" in text:
        text = text.strip().splitlines()[-1].split(": ", 1)[-1]
    return text


def out_of_memory(e: BaseException) -> bool:
    """A failed allocation: NumPy's and Python's ``MemoryError``, torch's out-of-memory errors (the
    CUDA one is a ``RuntimeError`` subclass, the CPU allocator's a plain ``RuntimeError``)."""
    text = str(e)
    return isinstance(e, MemoryError) or type(e).__name__ == "OutOfMemoryError" or any(
        words in text for words in ("can't allocate memory", "not enough memory", "out of memory") + TOO_LARGE)


#: What torch and NumPy say of a size beyond any memory (-K or --memory-bank of 2**62): reported
#: as a failed allocation (they were tracebacks).
TOO_LARGE = ("Storage size calculation overflowed", "array is too big", "Maximum allowed size exceeded",
             "Maximum allowed dimension exceeded")


def memory_message(e: BaseException) -> str:
    """One line for a failed allocation: what could not be allocated, and what to lower."""
    text = (str(e).strip().splitlines() or [type(e).__name__])[-1]
    return (f"out of memory ({type(e).__name__}: {text[:300]}): lower the sizes (--embedding-dim, --image-size, "
            f"--memory-bank, -P/-K, --eval-batch-size, --shapes-train/test-per-class) or free memory")


#: The most --threads may ask for (a larger value was a traceback from torch.set_num_threads).
MAX_THREADS = 4096


def _threads(put_back: Optional[int] = None) -> int:
    """PyTorch's CPU thread count, after putting back ``put_back`` (the caller's, when a program
    run in-process ends: ``--threads`` sets it for the whole process, and a notebook's next run
    without ``--threads`` ran on the last one's; a probe, 2026-12-07)."""
    import torch

    if put_back is not None and torch.get_num_threads() != put_back:
        torch.set_num_threads(put_back)
    return torch.get_num_threads()


def _set_threads(n: Optional[int], program: str = "daal-train") -> None:
    from .ddp import ConfigError
    from .devices import available_cpus
    from .log import Log, plural

    if n is not None:
        if not 1 <= n <= MAX_THREADS:  # torch takes a C int; far more threads than cores only take turns
            raise ConfigError(f"--threads must be between 1 and {MAX_THREADS}, got {n}")
        import torch

        torch.set_num_threads(n)
        cores = available_cpus()
        if n > cores:  # allowed (another process may leave), but usually slower: threads take turns on a core
            Log(program)(f"--threads {n} is more than the {plural(cores, 'CPU core')} this process "
                         f"may use: threads will take turns, which is usually slower than --threads {cores}")


def build_eval_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="daal-eval", description="Evaluate a daal-train checkpoint on the held-out classes of its data set "
                                      "(or of another one given with --dataset/--data-root).",
        formatter_class=_HelpFormatter)
    p.add_argument("checkpoint", help="checkpoint_last.pt or checkpoint_best.pt written by daal-train")
    p.add_argument("--out", default=None, help="where to write eval.json and tsne_eval.png (default: next to the checkpoint)")
    p.add_argument("--baselines", action="store_true", help="also evaluate raw pixels")
    p.add_argument("--save-embeddings", default=None, metavar="FILE",
                   help="also write the test embeddings, labels and image paths to FILE: a .npz (numpy) if the "
                        "name ends in .npz, else a torch file that loads with torch.load(FILE, weights_only=True)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace eval.json, tsne_eval.png and the --save-embeddings file if they exist "
                        "(without it, existing files are refused; with --no-tsne an earlier tsne_eval.png is "
                        "removed, as it would not show this evaluation)")
    _add_common(p)
    for a in p._actions:  # unset options keep the checkpoint's values
        if a.dest == "seed":  # nothing is initialised here: it draws the metrics' and the plot's randomness
            a.help = ("seed of the evaluation's random draws: the k-means restarts of NMI and sub-cluster NMI, and "
                      "the t-SNE (the checkpoint's seed reproduces the metrics recorded in training)")
        if a.dest not in ("help", "checkpoint", "out", "baselines", "tsne", "progress", "save_embeddings",
                          "overwrite", "threads"):
            a.default = None
            if not isinstance(a, argparse._StoreConstAction):  # --no-amp: a switch, its help says what it does
                a.help = f"{(a.help or '').split(' (default:')[0]} (default: the checkpoint's)"  # one default, not daal-train's too
    return p


def eval_main(argv: Optional[List[str]] = None) -> int:
    """``daal-eval CHECKPOINT``: embed the test set, print and save every metric, plot t-SNE."""
    from daal_triton import NonFiniteError

    from .checkpoint import CheckpointError
    from .data import DatasetLayoutError
    from .ddp import ConfigError

    threads = _threads()
    try:
        args = build_eval_parser().parse_args(argv)
        _evaluate_checkpoint(args)  # prints the table, writes eval.json (and the plot)
    except (UsageError, DatasetLayoutError, ConfigError, CheckpointError) as e:
        print(f"daal-eval: error: {_message(e)}", file=sys.stderr)
        return 2
    except NonFiniteError as e:
        print(f"daal-eval: error: the checkpoint's network gives non-finite embeddings ({e}): nothing was written",
              file=sys.stderr)
        return 1
    except OSError as e:
        print(f"daal-eval: error: {os_message(e)}", file=sys.stderr)
        return 1
    except (MemoryError, RuntimeError, ValueError) as e:
        if not out_of_memory(e):
            raise
        print(f"daal-eval: error: {memory_message(e)}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"daal-eval: interrupted ({stop_name()})", file=sys.stderr)
        return 130
    finally:
        _threads(threads)
    return 0


def _eval_outputs(args: argparse.Namespace) -> str:
    """``daal-eval``'s output folder, checked before any work: writable, and nothing in it (or at
    ``--save-embeddings``) replaced without ``--overwrite``."""
    from .config import OUTPUTS, REPLACED, _check_writable
    from .ddp import ConfigError

    if args.out is not None and not args.out.strip():  # as daal-train's --out: '' is no folder, not the default
        raise ConfigError(f"--out must name a folder, got {args.out!r} (leave it out for the checkpoint's folder)")
    out = args.out or os.path.dirname(os.path.abspath(args.checkpoint))
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    _check_writable(out)
    # a live --overwrite run puts the run it replaces back if it stops before its first checkpoint_last.pt,
    # removing what is there then; once it has one (its own: the old one is aside), nothing is put back
    if (os.path.isdir(os.path.join(out, REPLACED)) and not os.path.isfile(os.path.join(out, "checkpoint_last.pt"))
            and folder_in_use(out)):
        raise ConfigError(f"--out {out}: a daal-train --overwrite run is replacing the run there (it holds the "
                          f"folder's lock; the run it replaces is in {REPLACED}/ until its first checkpoint_last.pt): "
                          f"what daal-eval wrote there would be removed if that run stops; wait for it to end, or "
                          f"give another --out")
    targets = [os.path.join(out, "eval.json")] + ([os.path.join(out, "tsne_eval.png")] if args.tsne else [])
    if args.save_embeddings:
        save = args.save_embeddings
        # a run's own records too (its folder's and --out's), which --overwrite would not protect
        runs = {os.path.realpath(os.path.join(folder, name)): f"the run folder's {name}"
                for folder in (out, os.path.dirname(os.path.abspath(args.checkpoint)),
                               os.path.dirname(os.path.realpath(args.checkpoint)))  # through a link: its run's
                for name in OUTPUTS}
        taken = {**runs, os.path.realpath(out): "the --out folder", os.path.realpath(args.checkpoint): "the "
                 "checkpoint being evaluated", **{os.path.realpath(t): f"where daal-eval writes "
                                                  f"{os.path.basename(t)}" for t in targets}}
        if os.path.realpath(save) in taken:  # written over by daal-eval's own files, or the checkpoint lost
            raise ConfigError(f"--save-embeddings {save}: is {taken[os.path.realpath(save)]} (give another file "
                              f"name, e.g. embeddings.pt or embeddings.npz)")
        if is_special(save):  # a folder; a FIFO or a device (/dev/null) the rename would replace, even as root
            raise ConfigError(f"--save-embeddings {save}: {special_text(save)} (give a file name, e.g. "
                              f"embeddings.pt or embeddings.npz)")
        if os.path.lexists(save + ".tmp") and not os.path.islink(save + ".tmp"):  # a file of the user's, maybe
            raise ConfigError(f"--save-embeddings {save}: {save}.tmp is there, and daal-eval writes the embeddings "
                              f"to {os.path.basename(save)}.tmp first, then renames it: move or remove that file "
                              f"(a daal-eval stopped hard leaves one), or give another file name")
        # its folder writable, and the names still to be made (the file's own too) not too long
        _check_writable(save, "--save-embeddings", save, file=True)
        targets.append(save)
    for t in targets[:-1] if args.save_embeddings else targets:
        if is_special(t):
            raise ConfigError(f"{t} {special_text(t)}: daal-eval writes its {os.path.basename(t)} there (move it "
                              f"away, or give another --out)")
    held = [t for t in targets if os.path.exists(t)]
    if held and not args.overwrite:
        raise ConfigError(f"{', '.join(held)} already exist{'s' if len(held) == 1 else ''}: pass --overwrite to "
                          f"replace {'it' if len(held) == 1 else 'them'}, or another --out / --save-embeddings")
    return out


def _note_nmi(emb: Any, labels: Any, mode: str, what: str) -> None:
    """daal-eval's log line when ``--nmi`` leaves NMI out of ``what``'s row."""
    from . import evaluate as E
    from .log import Log

    why = E.nmi_skipped(emb, labels, mode)
    if why:
        Log("daal-eval")(f"{what}: {why}")


def _evaluate_checkpoint(args: argparse.Namespace) -> Dict[str, Dict[str, float]]:
    """The work of ``daal-eval``: the checkpoint's network on its (or the given) data set's test
    classes; writes eval.json and tsne_eval.png once the checkpoint and the data have loaded."""
    from . import evaluate as E
    from . import plots
    from .checkpoint import load_checkpoint, load_weights
    from .files import write_text_atomically
    from .data import build_datasets
    from .config import (check_backend, check_choices, check_data_flags, check_data_root, check_kinds, check_numbers,
                         check_width, checked_device, drop_unread_data_root, note_source)
    from .ddp import ConfigError
    from .devices import place_model, resolve_amp
    from .engine import build_model
    from .log import Log

    _set_threads(args.threads, "daal-eval")
    check_numbers(args, {k for k, v in vars(args).items() if v is not None})  # daal-train's bounds
    ck = load_checkpoint(args.checkpoint)  # a wrong file is the first thing to hear about
    out = _eval_outputs(args)
    source = f"the checkpoint {args.checkpoint}"
    check_kinds(ck["config"], f"{source}: its configuration")
    saved = dict({"width": 1.0}, **ck["config"])  # checkpoints before --width: full width
    drop_unread_data_root(saved)
    cfg = TrainConfig.from_dict(saved)
    for k, v in vars(args).items():
        if v is not None and hasattr(cfg, k) and k not in ("out", "overwrite"):
            setattr(cfg, k, v)
    if args.dataset not in (None, saved.get("dataset")) and args.data_root is None:
        cfg.data_root = None  # the checkpoint's folder holds its own data set, not the one asked for
    cfg.weights = None  # the checkpoint holds the trained trunk
    try:  # daal-eval has no --width: the checkpoint's own (a traceback from the network's constructor before)
        check_width(cfg)
    except ConfigError as e:
        raise ConfigError(f"{source}: its configuration: {e}") from None
    try:
        check_numbers(cfg)
        check_choices(cfg)
        check_data_root(cfg)
        check_data_flags(cfg, {k for k, v in vars(args).items() if v is not None})  # --data-seed with digits
        device = checked_device(cfg.device)
        check_backend("--knn-backend", cfg.knn_backend, device)
    except ConfigError as e:
        taken = {k: getattr(cfg, k) for k, v in vars(args).items() if v is None and hasattr(cfg, k)}
        raise note_source(e, taken, source) from None
    amp_dtype = resolve_amp(cfg.amp, device, Log("daal-eval"))
    _, test_ds = build_datasets(cfg.dataset, cfg.data_root, cfg.image_size, seed=cfg.data_seed, augment=cfg.augment,
                                shapes_train_per_class=cfg.shapes_train_per_class,
                                shapes_test_per_class=cfg.shapes_test_per_class, shapes_nuisance=cfg.shapes_nuisance,
                                progress=args.progress, train=False)
    for note in list(test_ds.notes) + E.test_split_notes(test_ds):
        Log("daal-eval")(note)
    net = build_model(cfg)
    load_weights(net, ck["model"], args.checkpoint, "network")
    model = place_model(net, device, cfg.channels_last)
    t0 = time.time()
    emb = E.embed(model, test_ds, device, batch_size=cfg.eval_batch_size, amp_dtype=amp_dtype,
                  num_workers=cfg.num_workers, progress=args.progress)
    labels = E.dataset_labels(test_ds)
    rows: Dict[str, Dict[str, float]] = {}
    if args.baselines:
        # on the run's device, as daal-train's baseline (a CPU tensor with --knn-backend triton on
        # a GPU machine was refused; with "auto" the kNN ran on the CPU)
        pixels = E.pixel_vectors(test_ds, progress=args.progress)
        _note_nmi(pixels, labels, cfg.nmi, "raw pixels")
        rows["raw pixels"] = E.all_metrics(pixels.to(device), labels.to(device), test_ds.modes,
                                           backend=cfg.knn_backend, seed=cfg.seed, nmi_mode=cfg.nmi)
    _note_nmi(emb, labels, cfg.nmi, "the checkpoint")
    rows[f"checkpoint (epoch {ck.get('epoch')})"] = E.all_metrics(emb.to(device), labels.to(device), test_ds.modes,
                                                                  backend=cfg.knn_backend, seed=cfg.seed, nmi_mode=cfg.nmi)
    os.makedirs(out, exist_ok=True)
    if args.save_embeddings:
        E.save_embeddings(args.save_embeddings, emb, labels, E.dataset_paths(test_ds, cfg.dataset),
                          class_names=list(test_ds.class_names), checkpoint=os.path.abspath(args.checkpoint),
                          dataset=cfg.dataset, epoch=ck.get("epoch"))
    # what was evaluated, so the numbers can be made again: the data (its folder, or the generated
    # set's seed and sizes), the image size and the metrics' seed (k-means for NMI)
    data: Dict[str, Any] = dict(dataset=cfg.dataset, data_root=cfg.data_root, image_size=cfg.image_size,
                                data_seed=cfg.data_seed, seed=cfg.seed, test_images=len(test_ds),
                                test_classes=test_ds.num_classes)
    if cfg.dataset == "shapes":
        data.update(shapes_train_per_class=cfg.shapes_train_per_class,
                    shapes_test_per_class=cfg.shapes_test_per_class, shapes_nuisance=cfg.shapes_nuisance)
    results = {name: nan_to_null(row) for name, row in rows.items()}  # null, as in metrics.jsonl
    text = json.dumps(dict(checkpoint=os.path.abspath(args.checkpoint), epoch=ck.get("epoch"), **data,
                           results=results, seconds=round(time.time() - t0, 2)), indent=2)
    write_text_atomically(os.path.join(out, "eval.json"), text)
    log = Log("daal-eval")
    stale = os.path.join(out, "tsne_eval.png")
    if args.overwrite and os.path.isfile(stale):  # an earlier evaluation's: replaced below, or gone (--no-tsne)
        os.remove(stale)
        if not cfg.tsne:
            log(f"removed {stale}: it showed an earlier evaluation (--overwrite, --no-tsne)")
    print(E.format_table(rows, E.table_keys(rows)), flush=True)  # the numbers first: the t-SNE takes a while
    log("wrote " + ", ".join([os.path.join(out, "eval.json")] + ([args.save_embeddings] if args.save_embeddings else [])))
    if cfg.tsne:
        path = os.path.join(out, "tsne_eval.png")
        try:
            plots.tsne_plot(emb, labels.numpy(), path, modes=test_ds.modes,
                            class_names=test_ds.class_names, mode_names=test_ds.mode_names,
                            max_points=cfg.tsne_max_points, seed=cfg.seed, progress=args.progress,
                            title=f"{cfg.dataset} test classes, {os.path.basename(args.checkpoint)}")
            log(f"wrote {path}")
        except Exception as e:  # the metrics are written: a plot must not lose them (as in daal-train)
            log(f"t-SNE plot failed: {e}")
    return rows


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
