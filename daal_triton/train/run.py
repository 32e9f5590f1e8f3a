"""One run of ``daal-train``: four steps around one :class:`RunState`.

:func:`build_run` (data, sampler, network, loss, optimiser, schedule) -> :func:`resume_run`
(``--resume``: a checkpoint's state) -> :func:`fit` (baselines, the epochs, evaluations,
checkpoints, metrics.jsonl) -> :func:`finish` (plots, the final table, results.txt).
:func:`run` joins the process group around them.

Distributed training (``torchrun ... -m daal_triton.train``, see :mod:`daal_triton.train.ddp`):
every rank takes its share of the same global P x K batch (:class:`~daal_triton.train.data.DistributedPKSampler`),
the network runs inside DistributedDataParallel, and :class:`~daal_triton.train.engine.GlobalBatchLoss`
gathers the ranks' embeddings and labels (with gradients) so the loss is computed on the global
batch on every rank; the loss's parameters stay outside DDP and are averaged after backward.
Rank 0 alone evaluates and writes; the other ranks wait at barriers.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import shutil
import signal
import time
from dataclasses import dataclass, field
from typing import IO, Any, Dict, Iterator, List, Optional, Set, Union

import numpy as np
import torch
from torch import nn

from daal_triton import NonFiniteError
from daal_triton.distributed import broadcast_params
from daal_triton.memory import MemoryBank

from . import ddp
from . import evaluate as E
from .checkpoint import (CheckpointError, load_checkpoint, load_weights, require_training_state, restore_rng,
                         rng_state, save_checkpoint)
from .config import (OUTPUTS, REPLACED, TrainConfig, check_data_flags, check_kinds, check_out,
                     check_resume_folder, checked_device, default_daal, in_use, note_source, resume_config,
                     taken_from_checkpoint, validate_config)
from .console import _stop_once, stop_name
from .data import DatasetLayoutError, DistributedPKSampler, PKSampler, SeededDraws, build_datasets
from .ddp import ConfigError
from .devices import (compile_network, loader_options, place_model, prepare_device, resolve_amp, resolve_backend,
                      seed_everything)
from .engine import (GlobalBatchLoss, build_criterion, build_miner, build_model, check_pml_on_a_batch, make_optimizer,
                     make_scheduler, train_one_epoch)
from .files import (append_whole, lock_folder, nan_to_null, os_message, read_json, unlink_if_link,
                    write_text_atomically)
from .log import Log, plural
from .model import NO_WEIGHTS_NOTE

Record = Dict[str, Any]

class Interrupted(KeyboardInterrupt):
    """Ctrl-C during a run; the message says what was kept and how to go on (printed as one line)."""


class Diverged(RuntimeError):
    """The training loss or the embeddings became NaN/inf: the run stops; the message says in which
    epoch, what is kept and what to change (printed as one line)."""


class WriteFailed(RuntimeError):
    """A file of the run could not be written (a full disk) once the run had started writing: the
    message says which, what is kept and how to go on (printed as one line; it said only "[Errno 28]
    No space left on device" for metrics.jsonl, and never what was kept: a probe, 2026-12-07)."""


@dataclass
class RunState:
    """Everything one run holds between its steps."""

    cfg: TrainConfig
    ctx: ddp.DistContext
    device: torch.device
    log: Log
    amp_dtype: Optional[torch.dtype]
    train_ds: Any
    test_ds: Any
    sampler: PKSampler
    loader: torch.utils.data.DataLoader
    steps: int  # batches per epoch
    model: nn.Module  # the bare network: evaluated and saved
    criterion: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    scaler: Optional[torch.amp.GradScaler]
    bank: Optional[MemoryBank]
    miner: Optional[nn.Module]
    t_start: float
    cpu_start: float
    net: Optional[nn.Module] = None  # what trains: the model, or its DistributedDataParallel wrapper
    loss_fn: Optional[GlobalBatchLoss] = None
    history: List[Record] = field(default_factory=list)  # every metrics.jsonl record, resumed ones too
    table: Dict[str, Record] = field(default_factory=dict)  # the final table's rows
    start_epoch: int = 1
    epoch: int = 0  # the last epoch trained
    done: int = 0  # the last epoch whose evaluation and checkpoints are written (rank 0)
    best: float = -1.0  # best held-out Recall@1 so far (checkpoint_best.pt)
    last: Optional[Record] = None  # the latest evaluation of the trained network
    emb: Optional[torch.Tensor] = None  # the test embeddings of that evaluation
    metrics_file: Optional[IO[bytes]] = None  # unbuffered: each record one whole line or none (_record)
    out_lock: Optional[int] = None  # the descriptor holding --out's lock (rank 0)
    replaced: Optional[str] = None  # --overwrite: the folder holding the previous run until this one finishes
    put_back: bool = False  # that run was put back (this one stopped before it could be resumed)
    resumes: List[Record] = field(default_factory=list)  # config.json's "resumes": one entry per --resume
    rank_rng: Optional[List[Any]] = None  # under torchrun: every rank's generators at the last epoch's end
    baselines: bool = False  # the raw-pixel and untrained rows are being evaluated (before epoch 1)
    noted: Set[str] = field(default_factory=set)  # the evaluation's notes logged so far (--nmi)

    @property
    def last_epoch(self) -> int:
        """The last epoch this call trains: --epochs, or --stop-after if earlier."""
        return self.cfg.epochs if self.cfg.stop_after is None else min(self.cfg.epochs, self.cfg.stop_after)

    @property
    def stopped(self) -> bool:
        """Whether this call stops (--stop-after) before the run's last epoch."""
        return self.last_epoch < self.cfg.epochs

    @property
    def main(self) -> bool:
        return self.ctx.is_main

    def path(self, name: str) -> str:
        return os.path.join(self.cfg.out, name)


def run(cfg: TrainConfig, given=None) -> Dict[str, Record]:
    """Train and evaluate as ``cfg`` says; write everything under ``cfg.out``; return the final
    table's rows ({method: metrics}; empty on ranks other than 0).

    With ``cfg.resume`` the configuration is the checkpoint's, overridden by the fields of ``cfg``
    set explicitly (``given``: their names, as :func:`daal_triton.train.cli.given_flags` returns
    them; None: every field that differs from its default), see :func:`~daal_triton.train.config.resume_config`.

    Under torchrun (``WORLD_SIZE`` > 1) this joins the process group (see :mod:`daal_triton.train.ddp`),
    trains data-parallel, and destroys the group at the end."""
    t_start, cpu_start = time.time(), time.process_time()
    checkpoint: Optional[Dict[str, Any]] = None
    changes: Dict[str, Any] = {}
    asked = cfg
    if cfg.resume:
        checkpoint = load_checkpoint(cfg.resume)
        require_training_state(checkpoint, cfg.resume)
        check_kinds(checkpoint["config"], f"the checkpoint {cfg.resume}: its configuration")
        cfg, changes = resume_config(checkpoint["config"], cfg, given)
    try:
        device = checked_device(cfg.device)
        validate_config(cfg, ddp.world_size(), device)
        if checkpoint is None and given:  # a resume's data set is its checkpoint's
            check_data_flags(cfg, given)
    except ConfigError as e:  # a setting the checkpoint gave, not the command line, is named as such
        if checkpoint is None:
            raise
        raise note_source(e, taken_from_checkpoint(cfg, asked, given), f"the checkpoint {cfg.resume}") from None
    if checkpoint is not None and _finished(cfg, checkpoint["epoch"]):
        return {}
    check_out(cfg)
    if checkpoint is not None:
        check_resume_folder(cfg, checkpoint["config"])
    ctx, device = ddp.setup(device, cfg.dist_backend, cfg.dist_timeout)
    state = None
    try:
        state = build_run(cfg, ctx, device, Log("daal-train", ctx.rank, ctx.world_size), t_start, cpu_start)
        if checkpoint is not None:
            assert cfg.resume is not None  # the checkpoint's file
            resume_run(state, checkpoint, cfg.resume)
            state.resumes.append(dict(checkpoint=os.path.abspath(cfg.resume), epoch=state.epoch, changed=changes,
                                      launch=dict(world_size=ctx.world_size, backend=ctx.backend)))
            if changes and state.main:
                state.log("resumed with changes: " + ", ".join(f"{k} {v['from']!r} -> {v['to']!r}"
                                                               for k, v in changes.items()))
            if state.main:
                _note_earlier_evaluation(state)
        distribute(state)
        fit(state)
        if state.main:
            finish(state)
        else:
            state.log(f"done ({time.time() - t_start:.1f} s); rank 0 wrote the outputs to {cfg.out}")
        ctx.barrier()
        return state.table
    except KeyboardInterrupt:
        raise Interrupted(_interrupted(cfg, state)) from None
    except OSError as e:
        if (isinstance(e, DatasetLayoutError) or state is None
                or state.main and state.metrics_file is None and not state.put_back):
            raise  # a damaged image (its own advice); before the run wrote anything: the file system's line alone
        raise WriteFailed(_interrupted(cfg, state, how=f"stopped ({os_message(e)})")) from None
    finally:
        ctx.close()


def _note_earlier_evaluation(state: "RunState") -> None:
    """A resumed run in a folder where daal-eval wrote ``eval.json`` (and ``tsne_eval.png``)
    leaves them as they are, and says that they describe a checkpoint from before the resume."""
    found = [n for n in ("eval.json", "tsne_eval.png") if os.path.isfile(state.path(n))]
    if not found:
        return
    epoch = None
    try:
        epoch = read_json(state.path("eval.json")).get("epoch")
    except (OSError, ValueError, AttributeError):
        pass
    of = f"of epoch {epoch}" if isinstance(epoch, int) else "of a checkpoint from before this resume"
    state.log(f"kept as it was: daal-eval's {' and '.join(found)} in {state.cfg.out}, {of}; the resumed run's "
              f"checkpoints are not in it: run daal-eval again once the run ends")


def _finished(cfg: TrainConfig, epoch: int) -> bool:
    """``--resume`` of a checkpoint at ``epoch``: :class:`ConfigError` for an ``--epochs`` or
    ``--stop-after`` it has already passed; True (after saying so) when the run is finished and
    finished writing (its ``results.txt``, written after the plots, holds this epoch's table; one
    from before a resume that added epochs does not count): nothing to do, nothing is written."""
    assert cfg.resume is not None
    if cfg.epochs < epoch:
        raise ConfigError(f"--epochs {cfg.epochs} is below the epoch of --resume {cfg.resume} ({epoch}): a resumed "
                          f"run continues after it (give --epochs {epoch} or more)")
    if cfg.stop_after is not None and cfg.stop_after <= epoch < cfg.epochs:
        raise ConfigError(f"--stop-after {cfg.stop_after}: --resume {cfg.resume} is at epoch {epoch} already "
                          f"(give a later epoch)")
    if epoch == cfg.epochs and results_epoch(os.path.join(cfg.out, "results.txt")) == epoch and \
            os.path.realpath(cfg.out) == os.path.realpath(os.path.dirname(os.path.abspath(cfg.resume))):
        Log("daal-train")(f"the run in {cfg.out} is finished (epoch {epoch} of {cfg.epochs}; its results.txt is "
                          f"there): nothing to do, nothing written; to train it longer, add --epochs N (N > {epoch})")
        return True
    return False


def results_epoch(path: str) -> Optional[int]:
    """The epoch whose table the ``results.txt`` at ``path`` holds (its row ``trained (LOSS, epoch N)``);
    None when there is no such file or row."""
    try:
        with open(path, encoding="utf-8") as f:
            found = re.findall(r"^trained \(.*, epoch (\d+)\)", f.read(), re.M)
    except (OSError, UnicodeDecodeError):
        return None
    return int(found[-1]) if found else None


def optimiser_overflow(e: RuntimeError) -> bool:
    """The error of a step whose size does not fit the parameters' dtype (``--lr 4e37``: AdamW's
    ``addcdiv_`` with ``value = -lr / (1 - beta1)``), as opposed to any other failure."""
    return "cannot be converted to type" in str(e) and "without overflow" in str(e)


def _diverged(state: "RunState", epoch: int, e: Union[Exception, str]) -> str:
    """What a run whose training became non-finite in ``epoch`` says: what, what is kept (the
    previous epoch's checkpoint: this epoch's is written after its evaluation), what to change."""
    cfg = state.cfg
    last = state.path("checkpoint_last.pt")
    kept = (f"{last} holds epoch {epoch - 1}" if epoch > 1 and os.path.isfile(last) and cfg.save in ("both", "last")
            else "no checkpoint_last.pt was written")
    again = "start again (another --out, or --overwrite)"
    if cfg.resume:  # --overwrite is no resume's flag: resume again, from this folder's checkpoint if it has one
        src = last if os.path.isfile(last) else cfg.resume
        again = f"resume again with daal-train --resume {shlex.quote(src)}{_threads_flag(state)}" + (
            "" if src == last else f" and another (empty) --out: {cfg.out} holds this attempt's files")
    if cfg.weight_decay >= 1 and cfg.lr * cfg.weight_decay >= 1:  # AdamW scales the weights by 1 - lr x decay
        return (f"training diverged in epoch {epoch} of {cfg.epochs} ({e}); the run stopped, {kept}. --weight-decay "
                f"{cfg.weight_decay:g} is too large for --lr {cfg.lr:g}: AdamW scales the weights by 1 - lr x weight "
                f"decay = {1 - cfg.lr * cfg.weight_decay:.3g} at each step; give a --weight-decay well below "
                f"{1 / cfg.lr:g} (1 / --lr), and {again}")
    return (f"training diverged in epoch {epoch} of {cfg.epochs} ({e}); the run stopped, {kept}. Try a lower "
            f"--lr / --loss-lr (now {cfg.lr:g} / {cfg.loss_lr:g}) or a longer --warmup-epochs, and {again}")


def resume_command(state: "RunState") -> str:
    """The command that continues the run: ``daal-train --resume`` its ``checkpoint_last.pt``
    (quoted for a shell: a path with spaces was printed as it is), with ``--threads`` on the CPU,
    where PyTorch's sums depend on the thread count and a resume is bit-identical only at the same
    one (``--threads`` is a setting of the process, not recorded: a run-folder probe, 2026-12-07)."""
    return f"daal-train --resume {shlex.quote(state.path('checkpoint_last.pt'))}{_threads_flag(state)}"


def _threads_flag(state: "RunState") -> str:
    """`` --threads N`` for a resume command on the CPU (see :func:`resume_command`), else ``""``."""
    return f" --threads {torch.get_num_threads()}" if state.device.type == "cpu" else ""


def _interrupted(cfg: TrainConfig, state: Optional["RunState"], how: str = "") -> str:
    """What a run stopped by Ctrl-C (or ``how``: by a failed write) says: where it stopped and how to go on."""
    how = how or f"interrupted ({stop_name()})"
    if state is not None and not state.main:
        return f"{how}; rank 0 says how to go on (the run writes to {cfg.out})"
    if state is None or state.metrics_file is None and not state.put_back:  # nothing written yet
        return f"{how} before the run wrote anything: run the same command again to start it"
    last = state.path("checkpoint_last.pt")
    where = (f"{how} while evaluating the baselines, before epoch 1 of {cfg.epochs}" if state.baselines
             else f"{how} in epoch {state.done + 1} of {cfg.epochs}" if state.done < state.last_epoch
             else f"{how} after epoch {state.done} of {cfg.epochs}, while writing the outputs")
    if state.put_back:  # what it wrote is gone, the run it was replacing back in place
        return (f"{where}, before it could be resumed: its files are removed and the run it was replacing "
                f"is back in {cfg.out}; run the same command again to start it")
    if os.path.isfile(last):
        return f"{where}: continue from its last checkpoint with {resume_command(state)}"
    why = "" if cfg.save in ("both", "last") else f" (--save {cfg.save} writes none)"
    if cfg.resume:  # resumed into a new folder: its source is intact; --overwrite is no resume's flag
        held = ", ".join(sorted(os.listdir(cfg.out))) if os.path.isdir(cfg.out) else "nothing"
        return (f"{where}, before this part's first checkpoint_last.pt in {cfg.out}{why}: resume again with the "
                f"same command and another (empty) --out (this attempt left {held} in {cfg.out}; {cfg.resume} is "
                f"as it was)")
    return (f"{where}, before any checkpoint_last.pt{why}: nothing to resume; start the run again with the same "
            f"command and --overwrite")


# ----------------------------------------------------------------------------- build

def build_run(cfg: TrainConfig, ctx: ddp.DistContext, device: torch.device, log: Log,
              t_start: float, cpu_start: float) -> RunState:
    """Data, sampler, network, loss, optimiser and schedule of ``cfg``, freshly initialised from
    ``cfg.seed`` (the order of construction fixes what the seed produces)."""
    amp_dtype = resolve_amp(cfg.amp, device, log)
    prepare_device(device)
    seed_everything(cfg.seed)
    train_ds, test_ds = build_datasets(cfg.dataset, cfg.data_root, cfg.image_size, seed=cfg.data_seed,
                                       augment=cfg.augment, shapes_train_per_class=cfg.shapes_train_per_class,
                                       shapes_test_per_class=cfg.shapes_test_per_class,
                                       shapes_nuisance=cfg.shapes_nuisance, progress=cfg.progress and ctx.is_main)
    if cfg.classes_per_batch > train_ds.num_classes:
        raise ConfigError(f"--classes-per-batch (P) = {cfg.classes_per_batch}, but {cfg.dataset} has "
                          f"{train_ds.num_classes} training classes: pass --classes-per-batch "
                          f"{train_ds.num_classes} (-P) or fewer")
    sampler = _sampler(cfg, ctx, train_ds.labels)
    if ctx.is_main:
        for note in list(train_ds.notes) + list(test_ds.notes) + E.test_split_notes(test_ds):
            log(note)
        few = int((np.bincount(train_ds.labels)[np.unique(train_ds.labels)] < cfg.samples_per_class).sum())
        if few:
            log(f"{few} of the {train_ds.num_classes} training classes {'has' if few == 1 else 'have'} fewer than "
                f"--samples-per-class (K) = {cfg.samples_per_class} images: their K slots repeat images (drawn "
                f"with replacement)")
        log(f"{cfg.dataset}: {plural(len(train_ds), 'training image')} of {plural(train_ds.num_classes, 'class')}, "
            f"{plural(len(test_ds), 'test image')} of {plural(test_ds.num_classes, 'held-out class')}; device {device}")
    if ctx.distributed:
        log(f"joined {ctx.world_size} processes ({ctx.backend}) on {device}: global batch "
            f"{sampler.p}x{sampler.k} = {sampler.global_batch_size}, {sampler.batch_size} images on this rank"
            + ("" if ctx.is_main else "; rank 0 evaluates and writes the outputs"))
    try:  # a --weights file of the other VGG; --loss-kwargs the loss does not take
        model = place_model(build_model(cfg), device, cfg.channels_last)
        if ctx.is_main and not cfg.weights:
            log(NO_WEIGHTS_NOTE)
        criterion = build_criterion(cfg.loss, train_ds.num_classes, cfg.embedding_dim, daal=cfg.daal,
                                    loss_kwargs=cfg.loss_kwargs,
                                    backend=resolve_backend(cfg.loss_backend, device)).to(device)
        miner = build_miner(cfg.miner, cfg.miner_kwargs)
        check_pml_on_a_batch(criterion, miner, train_ds.num_classes, cfg.embedding_dim, device, loss=cfg.loss,
                             miner_name=cfg.miner)
    except (ValueError, ImportError) as e:
        raise ConfigError(str(e)) from None
    # Each image's augmentation is drawn from its own seed, which the sampler draws from --seed,
    # the epoch and the image's place in the global batch (SeededDraws): the same whatever
    # --num-workers, the world size or a resume. Workers start afresh each epoch (not persistent),
    # as the loader then takes one number from this process's generator per epoch whatever their
    # number, so the network's random draws do not depend on it either.
    if ctx.is_main and cfg.warmup_epochs >= cfg.epochs > 0:
        peak = cfg.lr * cfg.epochs / cfg.warmup_epochs
        log(f"--warmup-epochs {cfg.warmup_epochs:g} spans the whole run (--epochs {cfg.epochs}): the learning rate "
            + ("rises to --lr at the end" if peak >= cfg.lr else
               f"rises only to about {peak:.3g} (--lr {cfg.lr:g} x {cfg.epochs}/{cfg.warmup_epochs:g}) by the end")
            + " and never decays")
    k = dict(default_daal(), **cfg.daal).get("k") if cfg.loss == "daal" else None
    if ctx.is_main and isinstance(k, int) and not cfg.memory_bank and cfg.samples_per_class <= k and not cfg.resume:
        others = cfg.samples_per_class - 1  # the kNN's reference set: the batch (docs/method.md: k_i = min(k, |S_i|))
        radius = f"its radius averages {plural(others, 'distance')}" if others else "it has no radius (inf)"
        log(f"DAAL's k is {k} (--daal-k), but with -K {cfg.samples_per_class} a sample has "
            f"{plural(others, 'other sample')} of its class in a batch, so {radius}; give -K {k + 1} or more, or a "
            f"--memory-bank, for {k} neighbours")
    if ctx.is_main and cfg.stop_after is not None and cfg.stop_after >= cfg.epochs:
        log(f"--stop-after {cfg.stop_after} is not before the last epoch (--epochs {cfg.epochs}): the run is not "
            f"stopped early")
    loader = torch.utils.data.DataLoader(SeededDraws(train_ds), batch_sampler=sampler,
                                         **loader_options(cfg.num_workers, device, persistent=False))
    steps = len(sampler) if cfg.steps_per_epoch is None else min(len(sampler), cfg.steps_per_epoch)
    optimizer = make_optimizer(model, criterion, lr=cfg.lr, loss_lr=cfg.loss_lr, weight_decay=cfg.weight_decay)
    return RunState(
        cfg=cfg, ctx=ctx, device=device, log=log, amp_dtype=amp_dtype, train_ds=train_ds, test_ds=test_ds,
        sampler=sampler, loader=loader, steps=steps, model=model, criterion=criterion, optimizer=optimizer,
        scheduler=make_scheduler(optimizer, cfg.epochs * steps, warmup_steps(cfg.warmup_epochs, steps)),
        scaler=torch.amp.GradScaler("cuda") if amp_dtype == torch.float16 else None,
        bank=MemoryBank(cfg.memory_bank, cfg.embedding_dim, device=device) if cfg.memory_bank else None,
        miner=miner, t_start=t_start, cpu_start=cpu_start)


def warmup_steps(warmup_epochs: float, steps: int) -> int:
    """The steps of ``--warmup-epochs`` at ``steps`` a epoch. One far beyond the run (``1e307``:
    an infinite product, an OverflowError when made an integer) is held at 2**62 steps: the rate
    stays about 0 all run, as it would."""
    return int(round(min(warmup_epochs * steps, 2.0 ** 62)))


def _sampler(cfg: TrainConfig, ctx: ddp.DistContext, labels) -> PKSampler:
    """The P x K sampler: the whole global batch in one process, this rank's share under torchrun."""
    if not ctx.distributed:
        return PKSampler(labels, cfg.classes_per_batch, cfg.samples_per_class, seed=cfg.seed, seeded=True)
    try:
        return DistributedPKSampler(labels, cfg.classes_per_batch, cfg.samples_per_class,
                                    rank=ctx.rank, world_size=ctx.world_size, seed=cfg.seed, seeded=True)
    except ValueError as e:
        raise ConfigError(str(e)) from e


_IMPLEMENTATION = ("fused", "foreach", "capturable")


def _here(saved: Dict[str, Any], optimizer: torch.optim.Optimizer) -> Dict[str, Any]:
    """The optimiser state ``saved`` with this device's implementation flags (``make_optimizer``:
    fused AdamW on CUDA, the default on the CPU) instead of those of the device it was saved on,
    which ``load_state_dict`` would otherwise keep (and place the step counters by)."""
    groups = saved.get("param_groups")
    if not isinstance(groups, list) or len(groups) != len(optimizer.param_groups):
        return saved  # load_weights says what does not fit
    return dict(saved, param_groups=[
        dict(g, **{k: fresh[k] for k in _IMPLEMENTATION if k in fresh}) if isinstance(g, dict) else g
        for g, fresh in zip(groups, optimizer.param_groups)])


def _as_recorded_before(name: str) -> str:
    """A class folder's name as checkpoints before 2026-12-07 recorded it: its bytes that are not
    UTF-8 as U+FFFD, where the names are now escaped (``caf\\xe9``)."""
    return re.sub(r"\\x[89a-f][0-9a-f]", "\ufffd", name)


def _check_classes(saved, here: List[str], path: str, dataset: str) -> None:
    """:class:`CheckpointError` when the checkpoint's training classes (``saved``, in label order;
    None in checkpoints before 2026-12-02) are not the data's: its segments would belong to others."""
    if saved is None or list(saved) == here or list(saved) == [_as_recorded_before(n) for n in here]:
        return
    if not isinstance(saved, list):
        raise CheckpointError(f"checkpoint {path!r}: its train_classes entry is not a list of names")
    first = next((i for i, (a, b) in enumerate(zip(saved, here)) if a != b), min(len(saved), len(here)))
    there_name = saved[first] if first < len(saved) else "none"
    here_name = here[first] if first < len(here) else "none"
    raise CheckpointError(f"checkpoint {path!r} was trained on other classes than {dataset} gives here ({len(saved)} "
                          f"there, {len(here)} here; class {first}: {there_name!r} there, {here_name!r} here): the "
                          f"loss's segments belong to its classes; is the data (--data-root) the run's?")


def resume_run(state: RunState, ck: Dict[str, Any], path: str) -> None:
    """Continue from checkpoint ``ck`` (read from ``path``): weights, optimiser, schedule, scaler,
    the metrics so far, the RNG states (rank 0) and the memory bank. Every rank reads the file
    (on several machines: a path they all see).

    The learning rates and weight decay are ``state.cfg``'s (the checkpoint's unless changed on
    resume), and the first resumed step runs at the rate the schedule of ``state.cfg`` gives its
    step: the optimiser's saved rate is the one after the last step of the previous call, which
    for a run that ended there is the schedule's end (0)."""
    load_weights(state.model, ck["model"], path, "network")
    _check_classes(ck.get("train_classes"), list(state.train_ds.class_names), path, state.cfg.dataset)
    load_weights(state.criterion, ck["loss"], path, "loss",
                 why=f"the loss holds one entry per training class, and {state.cfg.dataset} gives "
                     f"{state.train_ds.num_classes} here: is the data (--data-root) the run's?")
    groups = [(g["initial_lr"], g["weight_decay"]) for g in state.optimizer.param_groups]  # state.cfg's
    for name in ("optimizer", "scheduler", "scaler"):
        target = getattr(state, name)
        if target is not None and name in ck:
            load_weights(target, _here(ck[name], target) if name == "optimizer" else ck[name], path, name)
    sched = state.scheduler
    for g, (lr, wd) in zip(state.optimizer.param_groups, groups):
        g["initial_lr"], g["weight_decay"] = lr, wd
    sched.base_lrs = [lr for lr, _ in groups]
    for g, base, factor in zip(state.optimizer.param_groups, sched.base_lrs, getattr(sched, "lr_lambdas", [])):
        g["lr"] = base * factor(sched.last_epoch)  # what LambdaLR.step() sets at this step
    sched._last_lr = [g["lr"] for g in state.optimizer.param_groups]
    state.resumes = list(ck.get("resumes", []))
    state.history = list(ck.get("metrics", []))
    state.start_epoch = int(ck["epoch"]) + 1
    state.epoch = state.done = state.start_epoch - 1
    if "rng" in ck and state.main:
        restore_rng(ck["rng"], path)
    state.rank_rng = ck.get("rng_ranks")  # the other ranks restore theirs in distribute()
    bank = state.bank
    if bank is not None:
        saved = ck.get("memory_bank")
        if saved is not None and tuple(saved["embeddings"].shape) == (bank.size, bank.dim):
            bank.load_state_dict(saved)
        elif state.main:
            state.log(f"the checkpoint holds no memory bank of {bank.size} x {bank.dim}; starting an empty one")
    if state.main:
        at = (f"at epoch {state.start_epoch}" if state.start_epoch <= state.last_epoch
              else f"after its last epoch, {state.start_epoch - 1} (nothing left to train)")
        state.log(f"resumed from {path} {at}"
                  + (f" with {len(bank)} rows in the memory bank" if bank is not None else ""))


def distribute(state: RunState) -> None:
    """Wrap the network for training: DistributedDataParallel under torchrun (the loss's
    parameters start from rank 0's), the bare network in one process."""
    cfg, ctx = state.cfg, state.ctx
    state.net = state.model
    if ctx.distributed:
        broadcast_params(state.criterion.parameters())
        if cfg.sync_bn:
            state.model = nn.SyncBatchNorm.convert_sync_batchnorm(state.model)
        device_ids = [state.device.index] if state.device.type == "cuda" else None
        state.net = nn.parallel.DistributedDataParallel(state.model, device_ids=device_ids)
        if not ctx.is_main:  # random draws of its own on every rank (model and segments come from rank 0)
            saved = state.rank_rng if state.start_epoch > 1 else None
            if saved is not None and len(saved) == ctx.world_size:
                restore_rng(saved[ctx.rank], cfg.resume or "")  # a resume at the same world size goes on as if never stopped
            else:  # a fresh run, or a resume at another world size: draws of its own, not epoch 1's again
                seed_everything(cfg.seed + 1000003 * ctx.rank + 7919 * (state.start_epoch - 1))
    elif cfg.sync_bn:
        state.log("--sync-bn does nothing in a single process")
    if cfg.compile:  # the network only (the DDP wrapper under torchrun: compile(DDP(net))); state.model stays bare
        state.net = compile_network(state.net)
    state.loss_fn = GlobalBatchLoss(state.bank, state.miner)


# ----------------------------------------------------------------------------- fit

def fit(state: RunState) -> None:
    """Baselines (a fresh run), then the epochs from ``state.start_epoch``; rank 0 evaluates,
    writes metrics.jsonl and the checkpoints, and ends with the trained network's row."""
    cfg, ctx = state.cfg, state.ctx
    if state.main:
        _prepare_out(state)
    try:  # from here a failure puts an --overwrite's previous run back (config.json's write on a full
        # disk left it in .daal-replaced without a word: a review, 2026-12-07)
        if state.main:
            _write_config(state)
            if cfg.resume:  # the metrics so far are the checkpoint's (in a new --out too), then this call's
                write_text_atomically(state.path("metrics.jsonl"),
                                      "".join(json.dumps(nan_to_null(r)) + "\n" for r in state.history))
            if not cfg.resume:
                unlink_if_link(state.path("metrics.jsonl"))  # a link there: a new file, not one written through it
            state.metrics_file = open(state.path("metrics.jsonl"), "ab" if cfg.resume else "wb", buffering=0)
            _baselines(state)
        ctx.barrier()
        state.best = max([r["recall@1"] for r in state.history  # epochs without evaluation have no recall
                          if r.get("model") == "trained" and "recall@1" in r], default=-1.0)
        elsewhere = os.path.join(os.path.dirname(os.path.abspath(cfg.resume or "")), "checkpoint_best.pt")
        if (state.main and cfg.resume and state.best >= 0 and cfg.save in ("both", "best")
                and not os.path.exists(state.path("checkpoint_best.pt")) and os.path.isfile(elsewhere)
                and os.path.realpath(elsewhere) != os.path.realpath(state.path("checkpoint_best.pt"))):
            epoch = max((r for r in state.history if r.get("model") == "trained" and "recall@1" in r),
                        key=lambda r: r["recall@1"])["epoch"]
            state.log(f"the best evaluation so far (epoch {epoch}, Recall@1 {state.best:.4f}) is in {elsewhere}: "
                      f"{cfg.out} gets a checkpoint_best.pt when an epoch beats it")
        for epoch in range(state.start_epoch, state.last_epoch + 1):
            _train_epoch(state, epoch)
            ctx.barrier()  # the other ranks wait for rank 0's evaluation and checkpoint
        if state.main and not state.stopped:
            if state.emb is None:  # nothing trained in this call (resumed at the end): the last epoch's evaluation
                state.emb = _embed_test(state)
                state.last = next((r for r in reversed(state.history) if r.get("model") == "trained"
                                   and r.get("epoch") == state.epoch and "recall@1" in r), None)
                if state.last is None:
                    state.last = _evaluate(state, state.epoch, "trained", state.emb)
            assert state.last is not None
            state.table[f"trained ({cfg.loss}, epoch {state.epoch})"] = state.last
    except BaseException:
        if state.replaced is not None and not _resumable(state):  # nothing to go on from: nothing to keep
            _put_back(state, state.replaced)
            state.log(f"the run stopped before it wrote a checkpoint_last.pt to resume from: the previous run's "
                      f"files are back in {cfg.out}, as they were")
        elif state.replaced is not None:
            state.log(f"the previous run's files stay in {state.replaced} until this run finishes (daal-train "
                      f"--resume; or put them back by hand: remove this run's files, then move them into {cfg.out})")
        raise
    finally:
        if state.metrics_file is not None:
            state.metrics_file.close()
        if state.out_lock is not None:
            os.close(state.out_lock)  # releases the lock
            state.out_lock = None


def _write_config(state: RunState) -> None:
    """config.json: the configuration the run started with, its launch, and ``resumes``: one entry
    per ``--resume`` (checkpoint, epoch, the settings changed ``{"from": ..., "to": ...}``, launch).
    The configuration of the latest call is the first one with every change applied in order."""
    cfg, ctx = state.cfg, state.ctx
    launch = dict(world_size=ctx.world_size, backend=ctx.backend)
    if not state.resumes:
        write_text_atomically(state.path("config.json"), json.dumps(dict(cfg.to_dict(), launch=launch), indent=2))
        return
    first = cfg.to_dict()
    for entry in reversed(state.resumes):  # undo every resume's changes: the configuration it started with
        for name, change in entry["changed"].items():
            first[name] = change["from"]
    first["resume"] = None
    try:
        launch = read_json(state.path("config.json")).get("launch", launch)
    except (OSError, ValueError, AttributeError):
        pass
    write_text_atomically(state.path("config.json"),
                          json.dumps(dict(first, launch=launch, resumes=state.resumes), indent=2))


def _prepare_out(state: RunState) -> None:
    """Create --out and hold its lock (:func:`_lock_out`); with --overwrite, then move the previous
    run's outputs (nothing else) into ``--out/.daal-replaced``: put back if the run stops before
    it can be resumed (:func:`_resumable`: in its first epoch, up to its checkpoint's last byte; a
    damaged image found at its first read, a divergence, Ctrl-C; or at any time with ``--save
    best|none``), removed by :func:`finish` once the run (or a resume of it) has finished."""
    try:
        os.makedirs(state.cfg.out, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"--out {state.cfg.out}: cannot create it ({e.strerror or e})") from None
    state.out_lock = _lock_out(state.cfg.out)
    if not state.cfg.overwrite:
        return
    aside = state.path(REPLACED)
    if os.path.islink(aside) or os.path.lexists(aside) and not os.path.isdir(aside):  # not daal-train's
        raise ConfigError(f"--out {state.cfg.out} holds {REPLACED}, which is not a folder daal-train made (a link or "
                          f"a file): --overwrite would move files through it; move it away, then run this again")
    if os.path.isdir(aside):  # an --overwrite run stopped hard (killed) left the run it was replacing there
        if _resumable(state):
            shutil.rmtree(aside)  # that run could be resumed: it is what this one replaces, and it had replaced these
            state.log(f"--overwrite: removed {aside}, the run that the run in {state.cfg.out} (stopped after it "
                      f"wrote a checkpoint_last.pt, now replaced in turn) had replaced")
        else:  # it stopped before it could be resumed: the run it was replacing is the one this one replaces
            _put_back(state, aside)
            state.log(f"--overwrite: put back the run in {aside}, which an --overwrite run stopped before its "
                      f"first checkpoint_last.pt had set aside")
    # links too (one that points nowhere is no file): a link left here would be written through
    held = [name for name in OUTPUTS if os.path.isfile(state.path(name)) or os.path.islink(state.path(name))]
    if held:
        with _deferred_interrupt():  # never half a run aside
            os.makedirs(aside)
            for name in held:
                os.replace(state.path(name), os.path.join(aside, name))
            state.replaced = aside
        state.log(f"--overwrite: the previous run's {plural(len(held), 'file')} moved to {aside}: put back if this "
                  f"run stops before its first checkpoint_last.pt, removed once it finishes")


def _resumable(state: RunState) -> bool:
    """Whether the run in --out (an --overwrite run's: the previous run's files are aside) can be
    resumed: it wrote a checkpoint_last.pt (renamed into place when complete). Its metrics.jsonl
    records an epoch before that epoch's checkpoints are written, and ``--save best|none`` writes
    none: such a run has nothing to go on from, so the run it replaced is what is kept."""
    return os.path.isfile(state.path("checkpoint_last.pt"))


def _put_back(state: RunState, aside: str) -> None:
    """The files in ``aside`` (a replaced run) back into --out, in place of the run there."""
    if state.metrics_file is not None:
        state.metrics_file.close()
        state.metrics_file = None
    with _deferred_interrupt():  # a second Ctrl-C (the first one may have brought us here) waits for the end
        for name in OUTPUTS if os.listdir(aside) else ():  # an empty one puts nothing back: nothing to remove
            if os.path.isfile(state.path(name)):
                os.remove(state.path(name))
        for name in os.listdir(aside):
            os.replace(os.path.join(aside, name), state.path(name))
        os.rmdir(aside)
    if state.replaced == aside:
        state.replaced = None
        state.put_back = True


@contextlib.contextmanager
def _deferred_interrupt() -> Iterator[None]:
    """Ctrl-C (SIGINT) inside the block is held until its end, then raised as KeyboardInterrupt:
    moving a run's files is never stopped halfway. Outside the main thread (no signal handlers
    there) the block runs as it is."""
    got: List[int] = []
    try:
        previous = signal.signal(signal.SIGINT, lambda signum, _: got.append(signum))
    except ValueError:  # not the main thread
        yield
        return
    term = signal.getsignal(signal.SIGTERM)
    hold_term = term is _stop_once  # the console's: a SIGTERM is held as a Ctrl-C is (a caller's own is not)
    if hold_term:
        signal.signal(signal.SIGTERM, lambda signum, _: got.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, previous)
        if hold_term:
            signal.signal(signal.SIGTERM, term)
    if got:  # delivered now, to the handler the block held it from: it raises (the console's, Python's
        # default_int_handler), does what its owner wants (a caller's), or ignores it (SIG_IGN)
        handler = previous if got[0] == signal.SIGINT else term
        if callable(handler):
            handler(got[0], None)
        elif handler == signal.SIG_DFL:
            raise KeyboardInterrupt


def _lock_out(out: str) -> Optional[int]:
    """An exclusive advisory lock (``flock``) on the folder ``out`` itself, held until the run ends
    (no file is added): a second daal-train writing there, such as a resumed cell of a daal-study
    started again while the killed study's cell still runs, is refused before it writes anything
    (:class:`ConfigError`) instead of interleaving checkpoints with the first. Returns the
    descriptor holding it; None where locks are not available (not POSIX, a file system without
    ``flock``)."""
    try:
        return lock_folder(out)
    except BlockingIOError:
        raise ConfigError(in_use(out)) from None


def _baselines(state: RunState) -> None:
    """The raw-pixel and untrained-network rows: evaluated in a fresh run, taken from the
    history in a resumed one."""
    if state.cfg.baselines and state.start_epoch == 1:
        t0 = time.time()
        state.baselines = True
        pixels = _evaluate(state, 0, "raw_pixels", E.pixel_vectors(state.test_ds, progress=state.cfg.progress))
        state.table["raw pixels"] = pixels
        rec = _evaluate(state, 0, "untrained", _embed_test(state), embed_s=round(time.time() - t0, 2))
        state.table["untrained network"] = rec
        state.baselines = False
        state.log(f"baselines: raw pixels R@1 {pixels['recall@1']:.4f}, "
                  f"untrained network R@1 {rec['recall@1']:.4f} ({time.time() - t0:.1f} s)")
        return
    rows = {"raw_pixels": "raw pixels", "untrained": "untrained network"}
    for rec in state.history:
        if rec.get("model") in rows:
            state.table[rows[rec["model"]]] = rec


def _train_epoch(state: RunState, epoch: int) -> None:
    """One epoch on every rank; on rank 0 its record, log line and checkpoints."""
    cfg = state.cfg
    state.sampler.set_epoch(epoch)
    t0 = time.time()
    stats: Dict[str, Any] = {}
    assert state.net is not None and state.loss_fn is not None  # set by distribute()
    try:
        train_loss = train_one_epoch(state.net, state.criterion, state.loader, state.optimizer, state.scheduler,
                                     state.device, amp_dtype=state.amp_dtype, scaler=state.scaler,
                                     max_steps=state.steps, desc=f"epoch {epoch}/{cfg.epochs}",
                                     progress=cfg.progress and state.main, loss_fn=state.loss_fn,
                                     log_every=cfg.log_every, stats=stats)
    except (FloatingPointError, NonFiniteError) as e:  # the CPU's value checks, or the loss's periodic read
        raise Diverged(_diverged(state, epoch, e)) from None
    except RuntimeError as e:  # AdamW's first steps take lr / (1 - beta1^t), up to 10 x lr: over float32's range
        if not optimiser_overflow(e):
            raise
        raise Diverged(_diverged(state, epoch, f"the optimiser's step size overflows float32: {e}")) from None
    train_s = time.time() - t0
    speed = dict(data_wait_s=round(stats.get("data_wait_s", 0.0), 3),
                 # every rank trains an equal share: the run's images, not rank 0's
                 train_images_per_s=round(stats.get("images", 0) * state.ctx.world_size / max(train_s, 1e-9), 1))
    state.epoch = epoch
    if state.ctx.distributed and state.cfg.save in ("both", "last"):  # a collective: every rank, every epoch
        state.rank_rng = state.ctx.all_objects(rng_state())
    if not state.main:
        return
    msg = (f"epoch {epoch}/{cfg.epochs}: loss {train_loss:.4f} ({train_s:.1f} s, "
           f"CPU {time.process_time() - state.cpu_start:.0f} s so far)")
    evaluated = epoch == cfg.epochs or (cfg.eval_every > 0 and epoch % cfg.eval_every == 0)
    if evaluated:
        state.emb = _embed_test(state)
        try:
            state.last = _evaluate(state, epoch, "trained", state.emb, train_loss=train_loss,
                                   train_s=round(train_s, 2), **speed)
        except NonFiniteError as e:  # a finite loss, but the network in eval mode gives NaN/inf
            raise Diverged(_diverged(state, epoch, e)) from None
        msg += "  " + "  ".join(f"{k} {state.last[k]:.4f}" for k in ("recall@1", "nmi", "map@r") if k in state.last)
    else:
        _record(state, dict(epoch=epoch, model="trained", train_loss=train_loss, train_s=round(train_s, 2),
                            **speed, elapsed_s=round(time.time() - state.t_start, 2)))
    state.log(msg)
    # best before last: a run stopped between the two resumes from the previous epoch's
    # checkpoint_last.pt and evaluates this epoch again (the other order would leave a best epoch
    # recorded in the history that beats every later one but is in no checkpoint_best.pt)
    if evaluated and state.last is not None and state.last["recall@1"] > state.best:
        state.best = state.last["recall@1"]
        _save(state, "checkpoint_best.pt", full=False)
    _save(state, "checkpoint_last.pt", full=True)
    state.done = epoch


def _save(state: RunState, name: str, *, full: bool) -> None:
    """Write checkpoint ``name`` unless ``--save`` leaves it out: the network, the loss and the
    metrics; ``full`` adds what ``--resume`` needs (optimiser, schedule, scaler, memory bank)."""
    if state.cfg.save not in ("both", name[len("checkpoint_"):-len(".pt")]):
        return
    extra: Dict[str, Any] = dict(optimizer=state.optimizer, scheduler=state.scheduler, scaler=state.scaler,
                                 memory_bank=state.bank, rank_rng=state.rank_rng) if full else {}
    save_checkpoint(state.path(name), model=state.model, criterion=state.criterion, cfg=state.cfg,
                    epoch=state.epoch, metrics=state.history, world_size=state.ctx.world_size,
                    resumes=state.resumes, train_classes=state.train_ds.class_names, **extra)


def _embed_test(state: RunState) -> torch.Tensor:
    """The test set's embeddings by the bare network (DDP's forward would wait for the other ranks),
    with daal-eval's ``embed`` progress bar."""
    cfg = state.cfg
    return E.embed(state.model, state.test_ds, state.device, batch_size=cfg.eval_batch_size,
                   amp_dtype=state.amp_dtype, num_workers=cfg.num_workers, progress=cfg.progress and state.main)


def _evaluate(state: RunState, epoch: int, name: str, emb: torch.Tensor, **extra: Any) -> Record:
    """Every metric of ``emb`` on the test classes, recorded as one metrics.jsonl line."""
    t0 = time.time()
    labels = E.dataset_labels(state.test_ds).to(state.device)
    why = E.nmi_skipped(emb, labels, state.cfg.nmi)
    if why and why not in state.noted:  # once a run (a resumed one: once again)
        state.noted.add(why)
        state.log(why)
    m = E.all_metrics(emb.to(state.device), labels, state.test_ds.modes, backend=state.cfg.knn_backend,
                      seed=state.cfg.seed, nmi_mode=state.cfg.nmi)
    rec = dict(epoch=epoch, model=name, **m, **extra, eval_s=round(time.time() - t0, 2),
               elapsed_s=round(time.time() - state.t_start, 2))
    _record(state, rec)
    return rec


def _record(state: RunState, rec: Record) -> None:
    """Append ``rec`` to the history and to metrics.jsonl (NaN, a metric undefined on this data,
    is written as null)."""
    assert state.metrics_file is not None  # rank 0's, opened with --out
    append_whole(state.metrics_file, (json.dumps(nan_to_null(rec)) + "\n").encode(), state.path("metrics.jsonl"))
    state.history.append(rec)


# ----------------------------------------------------------------------------- finish

def finish(state: RunState) -> None:
    """Rank 0's end of a run: the final table printed, the plots, then results.txt (the table again).
    A plot that fails or takes long never holds back or loses the numbers (printed first; a failing
    plot is reported and skipped), and results.txt, written last and whole (renamed into place), is
    what marks the run finished: one interrupted while plotting is completed by ``--resume``."""
    from . import plots

    cfg = state.cfg
    if state.stopped:
        state.log(f"stopped after epoch {state.epoch} of {cfg.epochs} (--stop-after); continue with "
                  f"{resume_command(state)}"
                  + (f" (the run it replaces stays in {state.path(REPLACED)} until then)"
                     if os.path.isdir(state.path(REPLACED)) else ""))
        return
    text = E.format_table(state.table, keys=E.table_keys(state.table))
    text += (f"\n(held-out classes of {cfg.dataset}; wall time {time.time() - state.t_start:.1f} s, process CPU time "
             f"{time.process_time() - state.cpu_start:.1f} s on {plural(torch.get_num_threads(), 'thread')}; "
             f"outputs in {cfg.out})")
    print(text)
    try:
        plots.training_curves(state.history, state.path("training_curves.png"))
    except Exception as e:  # a plot must never lose a finished run
        state.log(f"training-curve plot failed: {e}")
    if cfg.tsne:
        t0 = time.time()
        try:
            plots.tsne_plot(state.emb, E.dataset_labels(state.test_ds).numpy(), state.path("tsne_test.png"),
                            modes=state.test_ds.modes, class_names=state.test_ds.class_names,
                            mode_names=getattr(state.test_ds, "mode_names", None), max_points=cfg.tsne_max_points,
                            seed=cfg.seed, progress=cfg.progress,
                            title=f"{cfg.dataset} test classes, {cfg.arch} + {cfg.loss}, epoch {state.epoch}")
        except Exception as e:
            state.log(f"t-SNE plot failed: {e}")
        else:
            state.log(f"t-SNE of the test embeddings: {state.path('tsne_test.png')} ({time.time() - t0:.1f} s)")
    elif os.path.isfile(state.path("tsne_test.png")):  # a resume with --no-tsne: an earlier epoch's picture
        state.log(f"kept as it was: {state.path('tsne_test.png')}, drawn before this run's last epoch ({state.epoch}) "
                  f"with --no-tsne; resume it again without --no-tsne to redraw it")
    write_text_atomically(state.path("results.txt"), text + "\n")
    if os.path.isdir(state.path(REPLACED)):  # the run an --overwrite replaced: this one has finished
        shutil.rmtree(state.path(REPLACED), ignore_errors=True)
        state.log(f"removed {state.path(REPLACED)}: the previous run, which this one (--overwrite) has replaced")
