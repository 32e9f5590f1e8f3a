"""A run's configuration (:class:`TrainConfig`, one field per ``daal-train`` flag) and the checks
that refuse, before any work, what cannot run."""
from __future__ import annotations

import dataclasses
import math
import os
import shlex
from dataclasses import dataclass, field
from typing import Any, Dict, Iterable, Optional

import torch

from daal_triton.core import Hyperparameters

from .ddp import ConfigError
from .devices import AMP_CHOICES, check_compile, resolve_device
from .files import folder_in_use, read_json, special_text

# The DAAL hyperparameters a run sets (``--daal-*``): all of the loss's but the reduction, which
# training fixes to "mean". Their defaults are the loss's own (daal_triton.Hyperparameters).
DAAL_TRAIN_FIELDS = tuple(name for name in Hyperparameters.names() if name != "reduction")


def default_daal() -> Dict[str, Any]:
    defaults = Hyperparameters().as_dict()
    return {name: defaults[name] for name in DAAL_TRAIN_FIELDS}


@dataclass
class TrainConfig:
    """Everything a run needs; ``daal-train --help`` documents each field (same names)."""

    dataset: str = "shapes"
    data_root: Optional[str] = None
    image_size: int = 32
    epochs: int = 20
    steps_per_epoch: Optional[int] = None
    classes_per_batch: int = 12
    samples_per_class: int = 4
    arch: str = "vgg19_bn"
    width: Optional[float] = None  # channel multiplier; None: model.default_width(dataset, weights)
    embedding_dim: int = 512
    weights: Optional[str] = None
    loss: str = "daal"
    daal: Dict[str, Any] = field(default_factory=default_daal)
    loss_kwargs: Dict[str, Any] = field(default_factory=dict)
    miner: Optional[str] = None  # "pml:<MinerName>", applied to the gathered batch before the loss
    miner_kwargs: Dict[str, Any] = field(default_factory=dict)
    loss_backend: str = "auto"
    lr: float = 1e-3
    loss_lr: float = 5e-3
    weight_decay: float = 1e-4
    warmup_epochs: float = 3.0  # issue 14 round G: narrows the seed spread on the tuning seeds
    amp: str = "auto"
    device: str = "auto"
    seed: int = 0
    data_seed: int = 0  # draws the shapes set; fixed by default, so seeds vary only the training
    out: str = "runs/shapes"
    overwrite: bool = False
    save: str = "both"
    resume: Optional[str] = None
    stop_after: Optional[int] = None
    eval_every: int = 1
    eval_batch_size: int = 128
    num_workers: Optional[int] = None  # None: auto (devices.loader_options)
    knn_backend: str = "auto"
    augment: str = "none"
    shapes_train_per_class: int = 120
    shapes_test_per_class: int = 100
    shapes_nuisance: float = 1.0
    baselines: bool = True
    tsne: bool = True
    tsne_max_points: int = 2000
    nmi: str = "auto"  # evaluate.nmi_skipped: "auto" leaves out a k-means of hours (SOP's 11,316 clusters)
    progress: bool = True
    memory_bank: int = 0
    dist_backend: str = "auto"
    dist_timeout: float = 60.0
    sync_bn: bool = False
    channels_last: Optional[bool] = None  # None: auto (on CUDA)
    compile: bool = False
    log_every: int = 50

    def to_dict(self) -> Dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Dict[str, Any]) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        if "seed" in d and "data_seed" not in d:  # runs before --data-seed drew the data from --seed
            d = dict(d, data_seed=d["seed"])
        return cls(**{k: v for k, v in d.items() if k in names})


SAVE_CHOICES = ("both", "last", "best", "none")
#: The settings with a fixed set of values: the flags' ``choices`` (cli), and what
#: :func:`check_choices` holds a configuration from a file or a checkpoint to.
CHOICES: Dict[str, tuple] = dict(
    dataset=("shapes", "digits", "cub200", "cars196", "sop", "folder"), amp=("auto", "bf16", "fp16", "none"),
    knn_backend=("auto", "triton", "reference"), arch=("vgg19", "vgg19_bn"), augment=("none", "shift", "crop"),
    loss_backend=("auto", "triton", "reference"), save=SAVE_CHOICES, dist_backend=("auto", "nccl", "gloo"),
    nmi=("auto", "on", "off"))


def check_choices(cfg: Any, source: str = "") -> None:
    """:class:`ConfigError` for a setting of ``cfg`` outside :data:`CHOICES` (``source``: where the
    configuration came from, e.g. ``--config FILE``; empty for the command line)."""
    for name, allowed in CHOICES.items():
        value = getattr(cfg, name, None)
        if value is not None and value not in allowed:
            where = f"{source}: " if source else ""
            raise ConfigError(f"{where}{flag_name(name) if not source else name} must be one of "
                              f"{', '.join(allowed)}, got {value!r}")


# VGG's five 2x2 max-poolings need at least 2**5 pixels a side.
MIN_IMAGE_SIZE = 32


def drop_unread_data_root(config: Dict[str, Any]) -> None:
    """A checkpoint's ``data_root`` beside a built-in data set: runs made before
    :func:`check_data_root` kept the folder they were given and never read; it is dropped (the
    run is the same) instead of refusing to resume or evaluate the run."""
    from .data import NEEDS_ROOT

    if config.get("dataset") not in NEEDS_ROOT:
        config["data_root"] = None


def check_data_root(cfg: TrainConfig) -> None:
    """``--data-root`` only with a data set read from a folder (a built-in one would ignore it), and
    only an existing folder."""
    from .data import NEEDS_ROOT

    if cfg.data_root and cfg.dataset not in NEEDS_ROOT:
        raise ConfigError(f"--data-root {cfg.data_root}: --dataset {cfg.dataset} is built in and reads no folder; "
                          f"give --dataset as the data set the folder holds ({', '.join(NEEDS_ROOT)})")
    if cfg.dataset in NEEDS_ROOT and not cfg.data_root:  # before anything runs (daal-study: before any cell)
        raise ConfigError(f"--dataset {cfg.dataset} needs --data-root (the folder that holds it)")
    if cfg.data_root and not os.path.isdir(cfg.data_root):  # a resumed run's may have moved: note_source says whose
        raise ConfigError(f"--data-root {cfg.data_root}: no such folder")


#: The data flags that only some data sets read: flag -> (field, the data sets that read it).
DATA_SET_FLAGS = {"--augment": ("augment", ("shapes", "digits")),
                  "--shapes-train-per-class": ("shapes_train_per_class", ("shapes",)),
                  "--shapes-test-per-class": ("shapes_test_per_class", ("shapes",)),
                  "--shapes-nuisance": ("shapes_nuisance", ("shapes",)),
                  "--data-seed": ("data_seed", ("shapes",))}  # the other sets are fixed files


def check_data_flags(cfg: TrainConfig, given: Iterable[str]) -> None:
    """A data flag given on the command line (``given``: the fields set there) for a data set that
    ignores it (``--augment`` with the photo sets, which always crop and flip; ``--shapes-*`` with
    any set but ``shapes``) is a :class:`ConfigError`, as ``--data-root`` with a built-in set is
    (:func:`check_data_root`): it would do nothing, but be recorded in config.json as if it had."""
    for flag, (name, readers) in DATA_SET_FLAGS.items():
        if name in given and cfg.dataset not in readers:
            raise ConfigError(f"{flag} is read by --dataset {' and '.join(readers)} only, but --dataset is "
                              f"{cfg.dataset}: it would do nothing"
                              + (" (the photo sets always train on random resized crops and flips)"
                                 if name == "augment" else ""))


def check_classes_per_batch(cfg: TrainConfig) -> None:
    """``-P`` at most the data set's training classes where they are known without reading it
    (daal-study: before any cell runs); else run.py's check, once the data are read."""
    from .data import MOST_TRAIN_CLASSES, NEEDS_ROOT

    most = MOST_TRAIN_CLASSES.get(cfg.dataset)
    if most is not None and cfg.classes_per_batch > most:
        raise ConfigError(f"--classes-per-batch (P) = {cfg.classes_per_batch}, but {cfg.dataset} has "
                          f"{'at most ' if cfg.dataset in NEEDS_ROOT else ''}{most} training classes: pass "
                          f"--classes-per-batch {most} (-P) or fewer")


def check_settings(cfg: TrainConfig) -> None:
    """The checks of :func:`validate_config` that need no device, world size or data: the numbers,
    the choices and the loss's settings (daal-study runs them on every configuration up front)."""
    check_numbers(cfg)
    check_choices(cfg)
    _check_loss(cfg)
    _check_miner(cfg)


def validate_config(cfg: TrainConfig, world_size: int, device: torch.device) -> None:
    """Refuse what cannot run or would mean nothing (:class:`ConfigError`, a ``ValueError``), in
    a world of ``world_size`` processes on ``device``. Reads no data and writes nothing."""
    check_settings(cfg)
    for flag, backend in (("--knn-backend", cfg.knn_backend), ("--loss-backend", cfg.loss_backend)):
        check_backend(flag, backend, device)
    check_width(cfg)
    check_data_root(cfg)
    check_classes_per_batch(cfg)
    if cfg.weights and cfg.width not in (None, 1, 1.0):
        raise ConfigError(f"--weights needs --width 1 (ImageNet weights exist only for torchvision's full-width "
                          f"VGG-19), got --width {cfg.width}")
    if cfg.weights and not cfg.resume and not os.path.isfile(cfg.weights):  # a resumed run's network is its checkpoint's
        found = special_text(cfg.weights) if os.path.exists(cfg.weights) else "no such file"
        raise ConfigError(f"--weights {cfg.weights}: {found} (expected a torchvision VGG state dict, e.g. "
                          f"vgg19_bn-c79401a0.pth; the program never downloads weights)")
    if isinstance(cfg.memory_bank, bool) or not isinstance(cfg.memory_bank, int) or cfg.memory_bank < 0:
        raise ConfigError(f"--memory-bank must be an integer >= 0 (0: off), got {cfg.memory_bank!r}")
    if cfg.memory_bank > INT_MAX:  # a traceback from torch.zeros before (a docs audit, 2026-12-07)
        raise ConfigError(f"--memory-bank must be at most 2**63 - 1 (a 64-bit integer), got {cfg.memory_bank}")
    if cfg.memory_bank and cfg.loss != "daal":
        raise ConfigError(f"--memory-bank is for --loss daal (its kNN density takes the bank as reference set); "
                          f"--loss {cfg.loss} cannot use it: pytorch-metric-learning's ref_emb does not take "
                          f"the batch as part of the reference set (wrap the loss in its CrossBatchMemory "
                          f"in your own loop instead)")
    if cfg.stop_after is not None and cfg.stop_after < cfg.epochs and cfg.save not in ("both", "last"):
        raise ConfigError(f"--stop-after {cfg.stop_after} with --save {cfg.save}: a stopped run continues from its "
                          f"checkpoint_last.pt, which --save {cfg.save} does not write (use --save last or both)")
    if cfg.overwrite and cfg.resume:
        raise ConfigError("--overwrite replaces the run in --out, --resume continues it: give one of them")
    if world_size > 1 and cfg.classes_per_batch % world_size:
        raise ConfigError(f"--classes-per-batch (P) = {cfg.classes_per_batch} must be divisible by the world size "
                          f"{world_size}: each rank takes P / world_size whole classes of every global batch")
    if cfg.sync_bn and world_size > 1 and device.type != "cuda":
        raise ConfigError("--sync-bn needs CUDA devices (SyncBatchNorm does not run on the CPU)")
    if cfg.amp not in AMP_CHOICES:
        raise ConfigError(f"--amp must be one of {', '.join(AMP_CHOICES)}, got {cfg.amp!r}")
    if cfg.compile:
        try:
            check_compile(device)
        except RuntimeError as e:
            raise ConfigError(str(e)) from None


#: The seeds --seed may take: it also seeds NumPy and scikit-learn's k-means (NMI), which take
#: 32-bit seeds only (a larger one failed in the first evaluation, after training).
SEED_LIMIT = 2 ** 32

#: The largest integer setting: sizes go to torch and NumPy as 64-bit integers (a larger
#: --embedding-dim or --image-size was a traceback from their conversion, not an error message).
INT_MAX = 2 ** 63 - 1
#: The largest --image-size (3 x 65,536^2 pixels: 13 GB a float32 image; a size beyond it could fail
#: in NumPy's reshapes, not as a failed allocation).
MAX_IMAGE_SIZE = 65536
#: The most --num-workers: each is a process forked at the start of every epoch (10**30 forked one
#: after another until the machine ran out, and no longer heard Ctrl-C).
MAX_NUM_WORKERS = 256
#: --dist-timeout's range in minutes: a second (below, the process group's timedelta rounded to 0 and
#: its start failed with a C++ trace) to 10^6 minutes (1e13 overflowed a C int: a traceback).
DIST_TIMEOUT_RANGE = (1 / 60, 1e6)

# (flag, field, lowest allowed value, whether that value itself is allowed)
_BOUNDS = (
    ("--epochs", "epochs", 1, True), ("--steps-per-epoch", "steps_per_epoch", 1, True),
    ("--classes-per-batch", "classes_per_batch", 1, True), ("--samples-per-class", "samples_per_class", 1, True),
    ("--image-size", "image_size", MIN_IMAGE_SIZE, True), ("--embedding-dim", "embedding_dim", 1, True),
    ("--lr", "lr", 0.0, False), ("--loss-lr", "loss_lr", 0.0, True), ("--weight-decay", "weight_decay", 0.0, True),
    ("--warmup-epochs", "warmup_epochs", 0.0, True), ("--eval-every", "eval_every", 0, True),
    ("--eval-batch-size", "eval_batch_size", 1, True), ("--num-workers", "num_workers", 0, True),
    ("--shapes-train-per-class", "shapes_train_per_class", 1, True),
    ("--shapes-test-per-class", "shapes_test_per_class", 1, True),
    ("--shapes-nuisance", "shapes_nuisance", 0.0, True), ("--tsne-max-points", "tsne_max_points", 2, True),
    ("--dist-timeout", "dist_timeout", 0.0, False), ("--log-every", "log_every", 1, True),
    ("--stop-after", "stop_after", 1, True), ("--seed", "seed", 0, True), ("--data-seed", "data_seed", 0, True),
)


def check_width(cfg: TrainConfig) -> None:
    """``--width`` in (0, 4] (None: the data set's default), as :func:`vgg19_features` builds it."""
    if cfg.width is not None and (isinstance(cfg.width, bool) or not isinstance(cfg.width, (int, float))
                                  or not 0 < cfg.width <= 4):
        raise ConfigError(f"--width must be a number in (0, 4], got {cfg.width!r}")


def check_numbers(cfg: Any, names: Optional[set] = None) -> None:
    """The numeric settings of ``cfg`` (a :class:`TrainConfig`, or daal-eval's arguments: any object
    with the fields' names) within their bounds; ``names``: only these fields."""
    for flag, name, low, inclusive in _BOUNDS:
        if names is not None and name not in names:
            continue
        value = getattr(cfg, name)
        if value is None and name in ("steps_per_epoch", "num_workers", "stop_after"):
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{flag} must be a finite number, got {value!r}")
        if value < low or (value == low and not inclusive):
            bound = f">= {low}" if inclusive else f"> {low}"
            why = " (VGG's five poolings need 32 pixels a side)" if name == "image_size" else ""
            raise ConfigError(f"{flag} must be {bound}{why}, got {value}")
        if name == "image_size" and value > MAX_IMAGE_SIZE:
            raise ConfigError(f"--image-size must be <= {MAX_IMAGE_SIZE}, got {value}")
        if name == "num_workers" and value > MAX_NUM_WORKERS:
            raise ConfigError(f"--num-workers must be <= {MAX_NUM_WORKERS} (worker processes), got {value}")
        if name == "dist_timeout" and not DIST_TIMEOUT_RANGE[0] <= value <= DIST_TIMEOUT_RANGE[1]:
            raise ConfigError(f"--dist-timeout must be between 1/60 (a second) and {DIST_TIMEOUT_RANGE[1]:g} "
                              f"minutes, got {value!r}")  # :g showed 1000001 as 1e+06, the limit
        if name == "shapes_nuisance" and value > 1:  # the generator's scales and offsets assume it
            raise ConfigError(f"--shapes-nuisance must be <= 1 (0 clean .. 1 the default), got {value}")
        if name == "seed" and value >= SEED_LIMIT:
            raise ConfigError(f"--seed must be < 2**32 = {SEED_LIMIT} (NumPy's and scikit-learn's seeds), got {value}")
        if isinstance(value, int) and value > INT_MAX:  # a size torch or NumPy take as a 64-bit integer
            raise ConfigError(f"{flag} must be at most 2**63 - 1 (a 64-bit integer), got {value}")


def _check_loss(cfg: TrainConfig) -> None:
    """``--loss``, ``--loss-kwargs`` and the DAAL hyperparameters, as far as they can be checked
    without building the loss."""
    if not isinstance(cfg.loss_kwargs, dict):
        raise ConfigError(f"--loss-kwargs must be a JSON object ({{\"name\": value, ...}}), got {cfg.loss_kwargs!r}")
    _check_finite(cfg.loss_kwargs, "--loss-kwargs")
    if cfg.loss == "daal":
        try:
            Hyperparameters(**dict(default_daal(), **cfg.daal))
        except (TypeError, ValueError) as e:
            raise ConfigError(f"DAAL hyperparameters (--daal-*): {e}") from None
        return
    if not cfg.loss.startswith("pml:") or not cfg.loss[4:]:
        raise ConfigError(f"--loss must be 'daal' or 'pml:<LossName>', got {cfg.loss!r}")
    try:
        from pytorch_metric_learning import losses as pml_losses
    except ImportError:
        raise ConfigError(f"--loss {cfg.loss} needs pytorch-metric-learning: pip install 'daal-triton[pml]'") from None
    if not isinstance(getattr(pml_losses, cfg.loss[4:], None), type):
        raise ConfigError(f"--loss {cfg.loss}: pytorch_metric_learning.losses has no loss named {cfg.loss[4:]!r}")


def _check_finite(value: Any, flag: str) -> None:
    """Every number in ``value`` (a ``--loss-kwargs`` object, nested lists and objects) finite:
    Python's JSON reads ``NaN`` and ``Infinity``, and a loss built with one diverged at its first
    step (``{"neg_margin": Infinity}``), blamed on --lr. Walked without recursion."""
    todo = [("", value)]
    while todo:
        where, v = todo.pop()
        if isinstance(v, float) and not math.isfinite(v):
            raise ConfigError(f"{flag}: {where or 'a value'} is {v}, not a finite number")
        items = v.items() if isinstance(v, dict) else enumerate(v) if isinstance(v, list) else ()
        todo.extend((f"{where}[{key!r}]" if where else repr(key), item) for key, item in reversed(list(items)))


def _check_miner(cfg: TrainConfig) -> None:
    """``--miner`` and ``--miner-kwargs``: the miner is built once (no data needed) and dropped."""
    if not isinstance(cfg.miner_kwargs, dict):
        raise ConfigError(f"--miner-kwargs must be a JSON object ({{\"name\": value, ...}}), got {cfg.miner_kwargs!r}")
    _check_finite(cfg.miner_kwargs, "--miner-kwargs")
    from .engine import build_miner  # engine imports this module

    try:
        build_miner(cfg.miner, cfg.miner_kwargs)
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None


def checked_device(name: str) -> torch.device:
    """``--device`` resolved (:func:`~daal_triton.train.devices.resolve_device`), or :class:`ConfigError`."""
    try:
        return resolve_device(name)
    except (ValueError, RuntimeError) as e:
        raise ConfigError(str(e)) from None


def check_backend(flag: str, backend: str, device: torch.device) -> None:
    """The Triton backends run on CUDA devices (on the CPU Triton has only its interpreter), and
    not on every one: ROCm, no Triton installed (Windows' CUDA wheels), a Triton or GPU too old
    (``daal_triton.backend.triton_reason``; these failed mid-run with a traceback)."""
    if backend != "triton":
        return
    if device.type != "cuda":
        raise ConfigError(f"{flag} triton needs a CUDA device, and this run uses {device.type} "
                          f"(use auto or reference)")
    from daal_triton.backend import triton_reason

    reason = triton_reason(device, forced=True)
    if reason:
        raise ConfigError(f"{flag} triton cannot run on {device}: {reason} (use auto or reference)")


#: Where --overwrite keeps the run it replaces until the new one has finished (or stopped before
#: its first checkpoint_last.pt: then it is put back).
REPLACED = ".daal-replaced"

#: Every file a run writes in --out, and what daal-eval writes there by default (it describes the run's
#: checkpoints); --overwrite replaces these (and only these): they are moved into REPLACED first,
#: put back if the new run stops before it can be resumed (run._resumable), removed once it finishes.
OUTPUTS = ("config.json", "metrics.jsonl", "checkpoint_last.pt", "checkpoint_best.pt", "checkpoint_last.pt.tmp",
           "checkpoint_best.pt.tmp", "config.json.tmp", "metrics.jsonl.tmp", "tsne_test.png", "training_curves.png",
           "results.txt", "results.txt.tmp", "eval.json", "tsne_eval.png")


def in_use(out: str) -> str:
    """What daal-train says of an --out whose lock another daal-train holds."""
    return (f"--out {out}: another daal-train is writing this run (it holds the folder's lock): wait for it to end "
            f"(or stop it), then run this command again")


def check_out(cfg: TrainConfig) -> None:
    """Refuse to write a new run into a folder that holds something, unless ``--resume`` (continue
    the run there) or ``--overwrite`` (replace it) says what to do with it."""
    out = cfg.out
    if not isinstance(out, str) or not out.strip():  # '' or blanks: a quoting slip ("$OUT" unset), no folder
        raise ConfigError(f"--out must name a folder, got {out!r}")
    if os.path.exists(out) and not os.path.isdir(out):
        raise ConfigError(f"--out {out}: exists and is not a folder")
    _check_writable(out)
    if os.path.isdir(out) and folder_in_use(out):  # before any advice on what is in it: a run is writing it
        raise ConfigError(in_use(out))
    if cfg.overwrite or not os.path.isdir(out):
        return
    if cfg.resume:  # continue the run in its own folder, or into a new (empty) one
        home = os.path.dirname(os.path.abspath(cfg.resume))
        if not os.listdir(out):
            return
        if os.path.realpath(home) == os.path.realpath(out):
            last = os.path.join(out, "checkpoint_last.pt")
            if os.path.exists(last) and cfg.save not in ("both", "last"):
                # its checkpoint_last.pt would stay behind while the run trained on: a later --resume
                # of it replaced those epochs' records, silently (a run-folder probe, 2026-12-07)
                raise ConfigError(f"--save {cfg.save} with --resume in the run's own folder would leave its "
                                  f"{last} at this checkpoint's epoch while the run trains on, and a later "
                                  f"--resume of it would replace the epochs trained since: keep --save both or "
                                  f"last here, or pass another --out for this part of the run")
            if not os.path.exists(last) or os.path.realpath(last) == os.path.realpath(cfg.resume):
                return
            raise ConfigError(f"--resume {cfg.resume} is not {last}, the run's own last state, which resuming "
                              f"here would replace: pass another --out for this branch of the run")
        raise ConfigError(f"--out {out} is not empty and is not the folder of --resume {cfg.resume}: a resumed run "
                          f"continues in its checkpoint's folder or in a new, empty one")
    held = sorted(os.listdir(out))
    if REPLACED in held:  # before the generic advice: --overwrite would decide what becomes of it
        aside = os.path.join(out, REPLACED)
        raise ConfigError(f"--out {out} holds {REPLACED}/, the run that an --overwrite run stopped hard (killed) was "
                          f"replacing: pass --overwrite to replace the run there (the one set aside comes back first "
                          f"if that run wrote no checkpoint_last.pt), or move {aside}/* back into {out} by hand")
    if held:
        shown = ", ".join(held[:4]) + (", ..." if len(held) > 4 else "")
        last = os.path.join(out, "checkpoint_last.pt")
        if os.path.isfile(last):
            raise ConfigError(f"--out {out} is not empty ({shown}): pass --resume {shlex.quote(last)} to continue that run, "
                              f"--overwrite to replace it, or another --out")
        raise ConfigError(f"--out {out} is not empty ({shown}) and holds no checkpoint_last.pt to resume: pass "
                          f"--overwrite to replace the run there (files daal-train does not write stay), or "
                          f"another --out")


def check_resume_folder(cfg: TrainConfig, saved: Dict[str, Any]) -> None:
    """A resumed run that continues in the folder its checkpoint lies in writes over that folder's
    config.json, metrics and plots: refuse when that folder's config.json is another run's (a
    ``checkpoint_last.pt`` copied into it), i.e. differs in what a resume keeps (RESUME_FIXED)."""
    path = os.path.join(cfg.out, "config.json")
    if not cfg.resume or cfg.overwrite or not os.path.isfile(path):
        return
    if os.path.realpath(os.path.dirname(os.path.abspath(cfg.resume))) != os.path.realpath(cfg.out):
        return  # a new, empty folder (check_out refuses any other)
    try:
        there = read_json(path)
    except (OSError, ValueError):
        return  # unreadable: rewritten from the checkpoint, as before
    if not isinstance(there, dict):
        return
    differ = [name for name in RESUME_FIXED if name in there and name in saved and not _same(there[name], saved[name])]
    if differ:
        name = differ[0]
        raise ConfigError(f"--resume {cfg.resume}: the run in {cfg.out} (its config.json) is another run than the "
                          f"checkpoint's ({flag_name(name)} {there[name]!r} there, {saved[name]!r} in the checkpoint): "
                          f"resuming here would write over it; pass another --out for this run")


#: The longest name the programs write inside an output folder (written as NAME.tmp, then renamed).
LONGEST_OUTPUT = "r1_vs_subcluster_nmi.png.tmp"


def _check_writable(out: str, flag: str = "--out", value: Optional[str] = None, *, file: bool = False) -> None:
    """``out`` (or, if it does not exist yet, its nearest existing parent) is a writable folder;
    ``flag value`` (default ``value``: ``out``) names the option that asks for it. The names to be
    made fit the file system: each within its name limit, and the whole path within its path
    limit with what is written there (``file``: ``out`` is a file, written as ``out.tmp``; else a
    folder that gets :data:`LONGEST_OUTPUT`): a path too long failed after the work, not before."""
    probe = os.path.abspath(out)
    if file:  # its folder must be writable
        probe = os.path.dirname(probe)
    while not os.path.exists(probe):
        probe = os.path.dirname(probe)
    shown = out if value is None else value
    if not os.path.isdir(probe):
        raise ConfigError(f"{flag} {shown}: {probe} is a file, not a folder")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {shown}: {probe} is not writable")
    try:
        name_max = os.pathconf(probe, "PC_NAME_MAX")
    except (OSError, ValueError, AttributeError):  # not POSIX
        name_max = 255
    parts = os.path.relpath(os.path.abspath(out), probe).split(os.sep)
    for i, part in enumerate(parts):
        if len(os.fsencode(part + (".tmp" if file and i == len(parts) - 1 else ""))) > name_max:
            raise ConfigError(f"{flag} {shown}: the name {part[:24]}... is longer than the file system's "
                              f"{name_max} bytes" + (" (with the .tmp it is first written as)" if file else ""))
    try:
        path_max = os.pathconf(probe, "PC_PATH_MAX")
    except (OSError, ValueError, AttributeError):  # not POSIX
        path_max = 4096
    longest = os.path.abspath(out) + (".tmp" if file else os.sep + LONGEST_OUTPUT)
    if len(os.fsencode(longest)) >= path_max:
        raise ConfigError(f"{flag} {shown}: the path is too long for the file system ({path_max} bytes with "
                          f"{'its .tmp' if file else 'the files written in it'})")


# ----------------------------------------------------------------------------- resume and --config
#
# A resumed run takes its configuration from the checkpoint; a flag given explicitly overrides it
# if it may change mid-run (RESUME_MAY_CHANGE: the length and schedule of the run, the optimiser's
# rates, evaluation, outputs, devices and speed). A flag that would change the data, the network,
# the loss or the state the checkpoint holds (RESUME_FIXED) is refused: that is a new run.

RESUME_MAY_CHANGE = ("epochs", "lr", "loss_lr", "weight_decay", "warmup_epochs", "stop_after", "eval_every",
                     "eval_batch_size", "num_workers", "knn_backend", "loss_backend", "device", "amp", "out",
                     "save", "tsne", "tsne_max_points", "nmi", "progress", "baselines", "dist_backend", "dist_timeout",
                     "sync_bn", "data_root", "channels_last", "compile", "log_every")
RESUME_FIXED = ("dataset", "image_size", "steps_per_epoch", "classes_per_batch", "samples_per_class", "arch",
                "embedding_dim", "weights", "loss", "daal", "loss_kwargs", "seed", "data_seed", "augment", "width", "miner",
                "miner_kwargs",
                "shapes_train_per_class", "shapes_test_per_class", "shapes_nuisance", "memory_bank")
# Fields that are not part of what a run is: never inherited, never recorded as a change.
_NOT_INHERITED = ("resume", "overwrite")


def flag_name(name: str) -> str:
    """The ``daal-train`` flag of a :class:`TrainConfig` field (or of ``daal.<name>``)."""
    if name.startswith("daal."):
        return "--daal-" + name[5:].replace("_", "-")
    return {"tsne": "--no-tsne", "baselines": "--no-baselines", "progress": "--no-progress"}.get(
        name, "--" + name.replace("_", "-"))


def _given_values(cfg: TrainConfig, given) -> Dict[str, Any]:
    """``{field: value}`` of the fields of ``cfg`` set explicitly: the names in ``given`` (``daal.<name>``
    for a DAAL hyperparameter), or, when ``given`` is None (a program calling ``run``), every field
    that differs from its default."""
    default = TrainConfig()
    if given is None:
        given = {f.name for f in dataclasses.fields(cfg)
                 if f.name != "daal" and getattr(cfg, f.name) != getattr(default, f.name)}
        given |= {f"daal.{k}" for k, v in cfg.daal.items() if default.daal.get(k) != v}
    out: Dict[str, Any] = {}
    for name in given:
        if name.startswith("daal."):
            out.setdefault("daal", {})[name[5:]] = cfg.daal[name[5:]]
        else:
            out[name] = getattr(cfg, name)
    return out


def _same(a: Any, b: Any) -> bool:
    return a == b and type(a) is type(b) or (isinstance(a, (int, float)) and isinstance(b, (int, float))
                                              and not isinstance(a, bool) and not isinstance(b, bool) and a == b)


def _same_file(a: Any, b: Any) -> bool:
    """Two paths of one file (``--weights`` as the checkpoint recorded it, relative in runs made
    before it was recorded absolute, and as given now)."""
    if not (isinstance(a, str) and isinstance(b, str)):
        return False
    try:
        return os.path.realpath(a) == os.path.realpath(b) or os.path.samefile(a, b)
    except OSError:
        return False


def resume_config(saved: Dict[str, Any], cfg: TrainConfig, given=None) -> "tuple[TrainConfig, Dict[str, Any]]":
    """The configuration of a run resumed from a checkpoint whose configuration is ``saved``: the
    checkpoint's, with the flags given explicitly (``given``: see :func:`_given_values`) that may
    change on resume; returns it and the changes, ``{field: {"from": old, "to": new}}``.

    :class:`ConfigError` for an explicit flag that would change the data, network or loss."""
    explicit = _given_values(cfg, given)
    base = TrainConfig.from_dict(dict({"width": 1.0}, **saved)).to_dict()  # before --width: full width
    drop_unread_data_root(base)
    merged = dict(base)
    for name in _NOT_INHERITED:
        merged[name] = getattr(cfg, name)
    merged["stop_after"] = cfg.stop_after  # stopping is the launch's choice, never the checkpoint's
    # A resumed run writes where its checkpoint lies unless --out says otherwise.
    if "out" not in explicit:
        assert cfg.resume is not None  # a resume's configuration
        here = os.path.dirname(os.path.abspath(cfg.resume))
        if os.path.realpath(str(base["out"])) != os.path.realpath(here):
            merged["out"] = here
    refused = []
    for name, value in explicit.items():
        if name == "daal":
            for k, v in value.items():
                if not _same(base["daal"].get(k), v):
                    refused.append((f"daal.{k}", base["daal"].get(k), v))
        elif name in RESUME_FIXED:
            if not (_same(base[name], value) or (name == "weights" and _same_file(base[name], value))):
                refused.append((name, base[name], value))
        elif name not in _NOT_INHERITED:
            merged[name] = value
    if refused:
        name, old, new = refused[0]
        more = f" (and {', '.join(flag_name(n) for n, _, _ in refused[1:])})" if len(refused) > 1 else ""
        raise ConfigError(f"--resume: {flag_name(name)} {new!r} differs from the checkpoint's {old!r}{more}: it would "
                          f"change the data, the network or the loss, which a resumed run keeps; start a new "
                          f"run (another --out) instead. On resume these may change: "
                          f"{', '.join(flag_name(n) for n in RESUME_MAY_CHANGE)}")
    changes = {name: {"from": base[name], "to": merged[name]} for name in merged  # stopping: the launch's
               if name not in _NOT_INHERITED + ("stop_after",) and not _same(base[name], merged[name])}
    return TrainConfig.from_dict(merged), changes


def _field_kinds() -> Dict[str, "tuple[type, bool]"]:
    """``{field: (type, whether None is allowed)}`` of :class:`TrainConfig`, from its annotations."""
    import typing

    out = {}
    for name, hint in typing.get_type_hints(TrainConfig).items():
        args = typing.get_args(hint)
        optional = typing.get_origin(hint) is typing.Union and type(None) in args
        if optional:
            hint = next(a for a in args if a is not type(None))
        out[name] = (typing.get_origin(hint) or hint, optional)
    return out


def note_source(e: ConfigError, taken: Dict[str, Any], source: str) -> ConfigError:
    """``e``, which names a flag, with a note when that flag was not given on the command line but
    its value taken from ``source`` (``taken``: ``{field: value}`` of those settings), so the user
    is not told about a flag they never gave without being told where it comes from."""
    msg = str(e)
    for name, value in taken.items():
        flag = flag_name(name)
        if msg.startswith((flag + " ", flag + ":")):
            shown = flag if isinstance(value, bool) else f"{flag} {value}"
            return ConfigError(f"{msg} ({shown} is the setting of {source}, not given on the command line: "
                               f"give {flag} to override it)")
    return e


def taken_from_checkpoint(cfg: TrainConfig, asked: TrainConfig, given=None) -> Dict[str, Any]:
    """``{field: value}`` of a resumed run's configuration ``cfg`` not given explicitly in ``asked``
    (the command line's; ``given``: see :func:`_given_values`): the checkpoint's settings."""
    explicit = _given_values(asked, given)
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in explicit}


def check_kinds(saved: Dict[str, Any], source: str, skip=("launch", "resumes")) -> None:
    """:class:`ConfigError` for a field of ``saved`` (a configuration read from ``source``: a
    config.json, a checkpoint) whose value is not of :class:`TrainConfig`'s type for it; unknown
    names and those in ``skip`` are not looked at."""
    kinds = _field_kinds()
    for name, value in saved.items():
        if name in skip or name not in kinds:
            continue
        kind, optional = kinds[name]
        if value is None and optional:
            continue
        ok = value is not None and (isinstance(value, bool) if kind is bool else
                                    isinstance(value, (int, float)) and not isinstance(value, bool) if kind is float
                                    else isinstance(value, int) and not isinstance(value, bool) if kind is int
                                    else isinstance(value, kind))
        if not ok:
            raise ConfigError(f"{source}: {name} must be {kind.__name__}{' or null' if optional else ''}, "
                              f"got {value!r}")


def config_file(path: str, cfg: TrainConfig, given=None) -> TrainConfig:
    """``--config FILE``: the configuration in ``FILE`` (a run's ``config.json``), with the flags
    given explicitly on top; a new run (``resume`` and ``overwrite`` are never taken from the file)."""
    try:
        saved = read_json(path)
    except FileNotFoundError:
        raise ConfigError(f"--config {path}: no such file") from None
    except OSError as e:
        raise ConfigError(f"--config {path}: {e.strerror or e}") from None
    except ValueError as e:
        raise ConfigError(f"--config {path}: not a readable JSON file ({e})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--config {path}: expected a JSON object of daal-train settings (a run's config.json)")
    names = {f.name for f in dataclasses.fields(TrainConfig)}
    unknown = sorted(set(saved) - names - {"launch", "resumes"})
    if unknown:
        raise ConfigError(f"--config {path}: unknown settings {', '.join(unknown)} (a config.json written by "
                          f"daal-train holds the fields of TrainConfig)")
    merged = TrainConfig().to_dict()
    check_kinds(saved, f"--config {path}", skip=("launch", "resumes", "resume", "stop_after"))
    for name in names:
        if name in saved and name not in ("resume", "overwrite", "stop_after"):
            merged[name] = dict(default_daal(), **saved[name]) if name == "daal" and isinstance(saved[name], dict) \
                else saved[name]
    for name, value in _given_values(cfg, given).items():
        if name == "daal":
            merged["daal"] = dict(merged["daal"], **value)
        else:
            merged[name] = value
    return TrainConfig.from_dict(merged)
