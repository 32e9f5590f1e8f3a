"""Files written whole or not at all, never over a FIFO or a device; JSON files read within bounds
(no torch here: ``daal-study`` writes its report and reads its study with them)."""
from __future__ import annotations

import errno
import json
import math
import os
import stat
import sys
from typing import IO, Any, Dict, List, Optional

#: The largest JSON file the programs read (a run's ``config.json``, a study file, a report's
#: ``study.json``): theirs are a few kB; a larger one, or ``/dev/zero``, is refused, not read on
#: until memory runs out.
MAX_JSON_BYTES = 16 * 2 ** 20
#: The deepest nesting of arrays and objects in the JSON the programs read (theirs: 4 levels). Deeper
#: input was a RecursionError traceback (Python 3.11's parser), or, parsed (3.12+), one in the code
#: that walked it.
MAX_JSON_DEPTH = 100


def write_atomically(path: str, write) -> None:
    """``write(path + ".tmp")``, then rename it to ``path``: a reader never sees half a file. When
    the writing fails (a full disk: ``torch.save`` raises a RuntimeError from its zip writer), the
    ``.tmp`` file is removed and an ``OSError`` names ``path``; anything else raised midway
    (Ctrl-C's KeyboardInterrupt) removes it too and goes on as it was."""
    tmp = path + ".tmp"
    if os.path.exists(path) and not os.path.isfile(path):  # the rename would replace a FIFO, a device, a folder
        raise OSError(errno.EEXIST, f"cannot write it: {_kind(path)} is there, not a file", path)
    unlink_if_link(tmp)  # writing through a link left at NAME.tmp would change the file it points to
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:  # a full disk, Ctrl-C midway: no half-written .tmp is left behind
        try:
            os.remove(tmp)
        except OSError:
            pass
        if not isinstance(e, (OSError, RuntimeError)):
            raise
        if isinstance(e, OSError) and e.strerror:
            raise OSError(e.errno, f"cannot write it ({e.strerror})", path) from None
        raise OSError(None, f"cannot write it (is the disk full? {str(e).strip().splitlines()[-1]})", path) from None


def write_text_atomically(path: str, text: str) -> None:
    """:func:`write_atomically` of a UTF-8 text file. A path the file system's encoding could not
    decode (a non-UTF-8 locale: ``LC_ALL=C`` with ``PYTHONUTF8=0``) holds surrogates in ``text``:
    they are written back as the bytes they stand for, as the name is on the disk."""
    def write(tmp):
        with open(tmp, "w", encoding="utf-8", errors="surrogateescape") as f:
            f.write(text)

    write_atomically(path, write)


def _kind(path: str, mode: Optional[int] = None) -> str:
    """What is at ``path`` (of ``mode``, where given) in words, when it is not a regular file."""
    if mode is None:
        try:
            mode = os.stat(path).st_mode
        except OSError:
            return "something that cannot be read"
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    if stat.S_ISSOCK(mode):
        return "a socket"
    return "a special file"


def is_special(path: str) -> bool:
    """Whether something other than a regular file (or a link to one) is at ``path``: a folder, a
    FIFO, a device, a socket. False where nothing is."""
    return os.path.exists(path) and not os.path.isfile(path)


def special_text(path: str) -> str:
    """``is a folder``, ``is a FIFO (named pipe), not a file`` ...: what :func:`is_special` found."""
    kind = _kind(path)
    return f"is {kind}" if kind == "a folder" else f"is {kind}, not a file"


def os_message(e: OSError) -> str:
    """One line for a file-system failure: what the system said and the file, not a traceback."""
    if e.strerror and e.filename is not None:
        return f"{e.strerror}: {e.filename}"
    if isinstance(e, BrokenPipeError) and e.strerror:  # a print to a pipe whose reader has gone (| head)
        return f"{e.strerror}: the program reading this output has stopped"
    return str(e)


def nan_to_null(record: Dict[str, Any]) -> Dict[str, Any]:
    """``record`` with each NaN value (a metric undefined on the data) as None: ``null`` in JSON,
    which has no NaN (``metrics.jsonl``, ``eval.json``)."""
    return {k: None if isinstance(v, float) and math.isnan(v) else v for k, v in record.items()}


def loads_json(text: str) -> Any:
    """``json.loads``, with every way it fails a ``ValueError``: malformed JSON, an integer of more
    digits than Python converts (4,300 unless ``PYTHONINTMAXSTRDIGITS`` says otherwise), arrays or
    objects nested deeper than :data:`MAX_JSON_DEPTH` (or than the parser's recursion)."""
    too_deep = f"nested too deeply to be read (more than {MAX_JSON_DEPTH} levels)"
    try:
        value = json.loads(text)
    except RecursionError:
        raise ValueError(too_deep) from None
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError) or "digits" not in str(e):
            raise
        digits = getattr(sys, "get_int_max_str_digits", lambda: 4300)()
        raise ValueError(f"an integer of more than {digits:,} digits") from None
    level: List[Any] = [value] if isinstance(value, (dict, list)) else []
    for _ in range(MAX_JSON_DEPTH):  # the containers one level down at a time, without recursion
        if not level:
            return value
        level = [v for x in level for v in (x.values() if isinstance(x, dict) else x) if isinstance(v, (dict, list))]
    if not level:
        return value
    raise ValueError(too_deep)


def read_json(path: str) -> Any:
    """The JSON value in the file at ``path``, read as UTF-8: a regular file, or a pipe (``--config
    <(...)``, ``/dev/stdin``). ``FileNotFoundError`` where nothing is there; another ``OSError``
    (its ``strerror`` says why) for a folder, a device or a socket (refused before they are opened:
    opening a device can act), more than :data:`MAX_JSON_BYTES` (``/dev/zero`` behind a pipe), or a
    file that cannot be read; ``ValueError`` for what is not JSON (see :func:`loads_json`;
    ``UnicodeDecodeError`` is one). A FIFO is opened without waiting for a writer: with none, it
    reads as empty, not JSON."""
    mode = os.stat(path).st_mode
    if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
        raise OSError(errno.EINVAL, f"{_kind(path, mode)}, not a file", path)
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0))
    try:
        mode = os.fstat(fd).st_mode  # what was opened (the path may have changed since)
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            raise OSError(errno.EINVAL, f"{_kind(path, mode)}, not a file", path)
        if stat.S_ISFIFO(mode) and hasattr(os, "set_blocking"):  # Windows: no set_blocking (to 3.11), no FIFOs
            os.set_blocking(fd, True)  # a pipe's writer may be slow; one that never wrote reads as the end
        chunks, size = [], 0
        while size <= MAX_JSON_BYTES:
            chunk = os.read(fd, MAX_JSON_BYTES + 1 - size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
    finally:
        os.close(fd)
    if size > MAX_JSON_BYTES:
        raise OSError(errno.EFBIG, f"larger than {MAX_JSON_BYTES // 2 ** 20} MiB: not a file of settings", path)
    return loads_json(b"".join(chunks).decode("utf-8"))


def unlink_if_link(path: str) -> None:
    """Remove ``path`` where it is a symbolic link (the link only: what it points to stays), so that
    opening it to write makes a file here instead of writing through the link into another folder."""
    if os.path.islink(path):
        os.remove(path)


def open_here(path: str, mode: str = "w") -> IO[Any]:
    """``open(path, mode)`` for writing a file of the programs' own (a log, a marker, a lock, a
    record appended to), never through a link: a link at ``path`` is removed first (what it points
    to stays), so a planted link cannot truncate or append to a file elsewhere. A FIFO, device or
    folder there is refused with an ``OSError`` naming ``path`` (a FIFO would hang the open). A
    binary ``mode`` opens it unbuffered (for :func:`append_whole`)."""
    unlink_if_link(path)
    if is_special(path):
        raise OSError(errno.EEXIST, f"cannot write it: {_kind(path)} is there, not a file", path)
    return open(path, mode, buffering=0) if "b" in mode else open(path, mode, encoding="utf-8")


def append_whole(f: IO[bytes], data: bytes, path: str) -> None:
    """Append ``data`` to the unbuffered binary file ``f`` (``path``) whole or not at all: a write
    that fails part-way (a full disk) is cut back off, and raised as an ``OSError`` naming ``path``
    (a record file with half a line stopped the next run that read it, and the error named no file:
    a probe, 2026-12-07)."""
    at = f.tell()
    rest = memoryview(data)
    try:
        while rest:
            n = f.write(rest)
            if not n:
                raise OSError(errno.EIO, "the write made no progress")
            rest = rest[n:]
    except OSError as e:
        try:
            f.truncate(at)
            f.seek(at)  # a file not opened to append would write its next line past a hole of NULs
        except OSError:
            pass
        raise OSError(e.errno, e.strerror or str(e), path) from None


def append_line(path: str, line: str) -> None:
    """Append ``line`` to the file ``path`` of the programs' own (:func:`open_here`), whole or not at
    all (:func:`append_whole`)."""
    with open_here(path, "ab") as f:
        append_whole(f, line.encode("utf-8"), path)


def lock_folder(path: str, *, shared: bool = False) -> Optional[int]:
    """A non-blocking advisory lock (``flock``) on the folder ``path`` itself, exclusive unless
    ``shared``: the descriptor that holds it (closing it releases the lock). ``BlockingIOError``
    where another process holds a lock in the way; None where locks are not available (not
    POSIX, a file system without ``flock``, a folder that cannot be opened)."""
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        return None
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        fcntl.flock(fd, (fcntl.LOCK_SH if shared else fcntl.LOCK_EX) | fcntl.LOCK_NB)
    except BlockingIOError:
        os.close(fd)
        raise
    except OSError:  # no flock here
        os.close(fd)
        return None
    return fd


def folder_in_use(path: str) -> bool:
    """Whether a daal-train holds the lock on the folder ``path`` (:func:`lock_folder`, taken for
    the whole run). False where locks are not available."""
    try:
        fd = lock_folder(path, shared=True)
    except BlockingIOError:
        return True
    if fd is not None:
        os.close(fd)
    return False
