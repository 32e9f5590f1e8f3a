"""Checkpoints: what a run saves (``checkpoint_last.pt``, ``checkpoint_best.pt``) and loads
(``--resume``, ``daal-eval``).

A checkpoint is a ``torch.save`` file of plain data only (tensors, dicts, lists, numbers,
strings; the RNG states as tensors and lists), so it loads with ``torch.load(path,
weights_only=True)``, which never runs code named in the file; :func:`load_checkpoint` loads
nothing else. It carries ``format`` (``daal-train checkpoint``) and ``sha256``, a digest of
everything else in it (every tensor's dtype, shape and bytes, every other value's type and
``repr``, in order), which :func:`load_checkpoint` recomputes: a flipped bit anywhere in the
weights is reported instead of being trained or evaluated on.
"""
from __future__ import annotations

import hashlib
import os
import pickle
import random
import warnings
from typing import Any, Dict, List, Optional, Tuple, cast

import numpy as np
import torch
from torch import nn

import daal_triton
from daal_triton.memory import MemoryBank

from .config import TrainConfig
from .files import special_text, write_atomically

FORMAT = "daal-train checkpoint"


class CheckpointError(ValueError):
    """A file that cannot be used as a checkpoint (printed as one ``error:`` line)."""


def save_checkpoint(path: str, *, model: nn.Module, criterion: nn.Module, cfg: TrainConfig, epoch: int,
                    metrics: List[Dict[str, Any]], optimizer=None, scheduler=None, scaler=None,
                    memory_bank: Optional[MemoryBank] = None, world_size: int = 1,
                    resumes: Optional[List[Dict[str, Any]]] = None,
                    rank_rng: Optional[List[Dict[str, Any]]] = None,
                    train_classes: Optional[List[str]] = None) -> None:
    """Write a checkpoint atomically (to ``path.tmp``, then rename). ``model`` is the bare network
    (not its DistributedDataParallel wrapper), so checkpoints of any world size load anywhere.
    ``resumes``: the run's resumes so far (config.json's ``resumes`` list), kept with its configuration.
    ``rank_rng``: under torchrun, every rank's :func:`rng_state` in rank order (``rng`` is this
    process's, rank 0's), so each rank resumes its own augmentation draws. ``train_classes``: the
    training classes' names in label order (the loss's segments belong to them), checked on resume."""
    state = dict(format=FORMAT, model=model.state_dict(), loss=criterion.state_dict(), config=cfg.to_dict(),
                 epoch=epoch, metrics=metrics, version=daal_triton.__version__, world_size=world_size)
    if resumes:
        state["resumes"] = resumes
    if train_classes is not None:
        state["train_classes"] = [str(c) for c in train_classes]
    if memory_bank is not None:
        state["memory_bank"] = memory_bank.state_dict()
    if optimizer is not None:
        state["optimizer"] = optimizer.state_dict()
    if scheduler is not None:
        state["scheduler"] = scheduler.state_dict()
    if scaler is not None:
        state["scaler"] = scaler.state_dict()
    state["rng"] = rng_state()
    if rank_rng is not None:
        state["rng_ranks"] = rank_rng
    state["sha256"] = digest(state)
    write_atomically(path, lambda tmp: torch.save(state, tmp))


def _looks_saved(path: str) -> bool:
    """Whether ``path`` starts as ``torch.save`` output does: a zip archive (since PyTorch 1.6; a
    truncated one still starts with its first entry's header) or a pickle (protocol 2+: byte 0x80;
    the legacy format starts with a pickled magic number)."""
    import zipfile

    if zipfile.is_zipfile(path):
        return True
    with open(path, "rb") as f:
        head = f.read(4)
    return head[:1] == b"\x80" or head == b"PK\x03\x04"


def _pickle_facts(path: str) -> Optional[tuple]:
    """``(protocol, names)`` of the pickle in ``path`` (a plain pickle, or the ``data.pkl`` inside
    ``torch.save``'s zip): its protocol and the ``module.name`` of every global it names, read by
    :mod:`pickletools`, which parses the opcodes and runs nothing. ``None`` if it does not parse."""
    import pickletools
    import zipfile

    try:
        if zipfile.is_zipfile(path):
            with zipfile.ZipFile(path) as z:
                member = next(n for n in z.namelist() if n.endswith("data.pkl"))
                data = z.read(member)
        else:
            with open(path, "rb") as f:
                data = f.read()
        protocol, top = 0, None  # top: the string last pushed, if it was
        names: List[str] = []
        strings: List[str] = []
        memo: Dict[int, Optional[str]] = {}
        arg: Any
        for op, arg, _ in pickletools.genops(data):
            if op.name == "MEMOIZE":  # memoises the top of the stack, which it leaves as it is
                memo[len(memo)] = top
                continue
            pushed = None
            if op.name == "PROTO":
                protocol = arg
            elif op.name == "GLOBAL":  # protocols 0-3: "module name"
                names.append(arg.replace(" ", "."))
            elif isinstance(arg, str) and "UNICODE" in op.name:
                pushed = arg
            elif op.name in ("BINGET", "LONG_BINGET", "GET"):
                pushed = memo.get(arg)
            elif op.name == "STACK_GLOBAL":  # protocol 4+: module and name pushed as strings before it
                names.append(".".join(strings[-2:]) if len(strings) >= 2 else "an unnamed global")
            if pushed is not None:
                strings.append(pushed)
            top = pushed
        return protocol, names
    except Exception:  # damaged, truncated, or no pickle at all
        return None


def _safe_globals() -> set:
    """The ``module.name`` globals torch's safe loader allows (tensors' rebuild functions, dtypes,
    ``OrderedDict``, ``set`` ...): a private table of torch's, read where it exists (torch 2.4 to 2.14)."""
    try:
        from torch import _weights_only_unpickler

        return set(_weights_only_unpickler._get_allowed_globals())
    except Exception:  # another torch's internals: every global counts as foreign
        return set()


def load_plain(path: str, what: str = "checkpoint",
               expected: str = "a checkpoint of this version of daal-train") -> Any:
    """``torch.load(path, weights_only=True)`` on the CPU; :class:`CheckpointError` naming ``what``
    (``checkpoint``, ``--weights``) for a missing, empty or damaged file, or one that would run
    code when unpickled (``expected``: what the file should have been)."""
    if os.path.isdir(path):
        inside = os.path.join(path, "checkpoint_last.pt")
        hint = f": did you mean {inside!r}?" if os.path.isfile(inside) else ""
        raise CheckpointError(f"{what} {path!r} is a folder, not a file{hint}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{what} {path!r} {special_text(path)}" if os.path.exists(path) else
                              f"{what} {path!r}: no such file")
    if os.path.getsize(path) == 0:
        raise CheckpointError(f"{what} {path!r} is empty (0 bytes)")
    try:
        with warnings.catch_warnings():  # a plain pickle (not torch.save's zip) draws a warning before the refusal
            warnings.filterwarnings("ignore", message="Detected pickle protocol")
            return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        text = str(e).lower()
        if "weights only" in text and "unsupported operand" not in text:  # a pickle naming code to run
            raise CheckpointError(f"{what} {path!r} holds Python objects beyond tensors and plain data: "
                                  f"refused, as unpickling them could run code (not {expected})") from None
        if not _looks_saved(path):  # a JSON, an image, a log...: torch's advice (weights_only=False) is no help
            raise CheckpointError(f"{what} {path!r} is not a PyTorch file (expected {expected})") from None
        facts = _pickle_facts(path) if "unsupported operand" in text else None
        if facts is not None and facts[0] >= 4:  # torch's safe loader stops at protocol 4's first FRAME opcode
            foreign = sorted(set(facts[1]) - _safe_globals())
            named = (f"; it names {', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}, "
                     f"Python objects beyond tensors and plain data, so unpickling it could run code"
                     if foreign else "")
            raise CheckpointError(f"{what} {path!r} was pickled with protocol {facts[0]}, which the safe loader "
                                  f"(torch.load with weights_only=True) does not read: refused unread{named} "
                                  f"(not {expected}; torch.save writes protocol 2)") from None
        detail = _first_line(e)
        if "weights_only" in detail:  # torch's advice to load unsafely: never what this program does
            detail = detail.split(". In PyTorch")[0].split(". Re-running")[0]
        raise CheckpointError(f"{what} {path!r} cannot be read: damaged, or not {expected} ({detail})") from None
    except Exception as e:  # torch reports truncation and zip damage as RuntimeError, EOFError, IndexError, ...
        if not _looks_saved(path):  # a text file whose first byte is a pickle opcode ("h": KeyError 101)
            raise CheckpointError(f"{what} {path!r} is not a PyTorch file (expected {expected})") from None
        raise CheckpointError(f"{what} {path!r} cannot be read: truncated or damaged "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def load_checkpoint(path: str) -> Dict[str, Any]:
    """The checkpoint at ``path``, its digest checked; :class:`CheckpointError` for a missing,
    empty, damaged, incomplete or foreign file, or one that would run code when unpickled."""
    ck = load_plain(path)
    if not isinstance(ck, dict) or ck.get("format") != FORMAT:
        raise CheckpointError(f"{path!r} is not a daal-train checkpoint (expected checkpoint_last.pt or "
                              f"checkpoint_best.pt written by daal-train)")
    stored = ck.pop("sha256", None)
    if stored != digest(ck):
        raise CheckpointError(f"checkpoint {path!r} is damaged: its content does not match the SHA-256 digest "
                              f"stored in it")
    bad = [name for name in ("config", "model", "loss") if not isinstance(ck.get(name), dict)]
    if bad or isinstance(ck.get("epoch"), bool) or not isinstance(ck.get("epoch"), int):
        raise CheckpointError(f"checkpoint {path!r} is incomplete: it holds no {' or '.join(bad or ['epoch'])} "
                              f"entry (every checkpoint daal-train writes has config, model, loss and epoch)")
    if ck["epoch"] < 0:
        raise CheckpointError(f"checkpoint {path!r}: its epoch is {ck['epoch']}, not a count of trained epochs")
    metrics = ck.get("metrics", [])
    # numbers or null but the model's name: a hand-made file with another value ended in a
    # traceback where the records are compared and written (a run-folder probe, 2026-12-07)
    if not isinstance(metrics, list) or not all(
            isinstance(r, dict) and isinstance(r.get("epoch"), int) and isinstance(r.get("model", ""), str)
            and all(v is None or isinstance(v, (int, float)) for k, v in r.items() if k != "model")
            for r in metrics):
        raise CheckpointError(f"checkpoint {path!r}: its metrics are not a list of per-epoch records")
    resumes = ck.get("resumes", [])
    if not isinstance(resumes, list) or not all(isinstance(r, dict) and isinstance(r.get("changed", {}), dict)
                                                for r in resumes):
        raise CheckpointError(f"checkpoint {path!r}: its resumes are not a list of records of the run's resumes")
    bad = [name for name in ("optimizer", "scheduler") if name in ck and not isinstance(ck[name], dict)]
    if bad:
        raise CheckpointError(f"checkpoint {path!r}: its {' and '.join(bad)} state is not a state dict")
    return ck


def load_weights(module: nn.Module, state: Dict[str, Any], path: str, what: str, why: str = "") -> None:
    """``module.load_state_dict(state)``, or :class:`CheckpointError`: the ``what`` (network, loss,
    optimiser) of checkpoint ``path`` does not fit the one built from its configuration (``why``:
    what may cause it)."""
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        why = why or "the checkpoint's weights and configuration do not belong together"
        raise CheckpointError(f"checkpoint {path!r}: its {what} does not fit the {what} built from its "
                              f"configuration ({load_error_detail(e)}): {why}") from None


def load_error_detail(e: BaseException) -> str:
    """The telling line of a ``load_state_dict`` error: the first after its "Error(s) in loading
    state_dict for ..." heading (the first size mismatch, missing or unexpected key), else its first."""
    lines = [ln.strip() for ln in str(e).strip().splitlines() if ln.strip()]
    detail = lines[1] if len(lines) > 1 and lines[0].startswith("Error(s) in loading") else _first_line(e)
    return detail.rstrip(".")


def require_training_state(ck: Dict[str, Any], path: str) -> None:
    """``--resume`` needs the optimiser and the schedule (``checkpoint_last.pt``); a checkpoint
    without them (``checkpoint_best.pt``: the network and loss only) is refused, never silently
    restarted with a fresh optimiser and schedule."""
    missing = [name for name in ("optimizer", "scheduler") if name not in ck]
    if missing:
        last = os.path.join(os.path.dirname(path), "checkpoint_last.pt")
        raise CheckpointError(f"--resume {path}: the checkpoint holds no {' or '.join(missing)} state (a "
                              f"checkpoint_best.pt holds the network and loss only), so the run cannot continue "
                              f"as it was: resume from {last} (written with --save last or both), or "
                              f"evaluate this one with daal-eval")


def digest(obj: Any) -> str:
    """SHA-256 of a checkpoint's content (everything but its ``sha256`` entry)."""
    h = hashlib.sha256()
    _feed(h, {k: v for k, v in obj.items() if k != "sha256"} if isinstance(obj, dict) else obj)
    return h.hexdigest()


def _feed(h, obj: Any) -> None:
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy())
    elif isinstance(obj, dict):
        h.update(f"D{len(obj)}".encode())
        for k, v in obj.items():
            _feed(h, k)
            _feed(h, v)
    elif isinstance(obj, (list, tuple)):
        h.update(f"L{len(obj)}".encode())
        for v in obj:
            _feed(h, v)
    elif obj is None or isinstance(obj, (bool, int, float, str, bytes)):
        r = repr(obj)
        h.update(f"{type(obj).__name__}{len(r)}:{r}".encode())
    else:
        raise TypeError(f"a checkpoint holds plain data only, not {type(obj).__name__}")


def rng_state() -> Dict[str, Any]:
    """The torch, numpy and Python generators' states as tensors, lists and numbers."""
    name, keys, pos, has_gauss, gauss = cast(Tuple[str, np.ndarray, int, int, float], np.random.get_state())
    version, internal, py_gauss = random.getstate()
    return dict(torch=torch.get_rng_state(),
                numpy=dict(name=name, keys=torch.from_numpy(keys.astype(np.int64)), pos=int(pos),
                           has_gauss=int(has_gauss), gauss=float(gauss)),
                python=dict(version=version, internal=list(internal), gauss=py_gauss))


def restore_rng(rng: Dict[str, Any], path: str = "") -> None:
    """Set the torch, numpy and Python generators to states saved by :func:`rng_state`;
    :class:`CheckpointError` (naming checkpoint ``path``) for states that are not such."""
    try:
        torch.set_rng_state(rng["torch"])
        n = rng["numpy"]
        np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["gauss"]))
        p = rng["python"]
        random.setstate((p["version"], tuple(p["internal"]), p["gauss"]))
    except (KeyError, TypeError, ValueError, AttributeError, RuntimeError, IndexError) as e:
        raise CheckpointError(f"checkpoint {path!r}: its random-generator states are damaged "
                              f"({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else "no detail"
