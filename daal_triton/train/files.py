"""Files written whole or not at all, never over a FIFO or a device; JSON files read within bounds
(no torch here: ``daal-study`` writes its report and reads its study with them)."""
from __future__ import annotations

import errno
import json
import os
import stat
from typing import Any

#: The largest JSON file the programs read (a run's ``config.json``, a study file, a report's
#: ``study.json``): theirs are a few kB; a larger one, or ``/dev/zero``, is refused, not read on
#: until memory runs out.
MAX_JSON_BYTES = 16 * 2 ** 20


def write_atomically(path: str, write) -> None:
    """``write(path + ".tmp")``, then rename it to ``path``: a reader never sees half a file. When
    the writing fails (a full disk: ``torch.save`` raises a RuntimeError from its zip writer), the
    ``.tmp`` file is removed and an ``OSError`` names ``path``; anything else raised midway
    (Ctrl-C's KeyboardInterrupt) removes it too and goes on as it was."""
    tmp = path + ".tmp"
    if os.path.exists(path) and not os.path.isfile(path):  # the rename would replace a FIFO, a device, a folder
        raise OSError(errno.EEXIST, f"cannot write it: {_kind(path)} is there, not a file", path)
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


def _kind(path: str) -> str:
    """What is at ``path`` in words, when it is not a regular file."""
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


def loads_json(text: str) -> Any:
    """``json.loads``, with every way it fails a ``ValueError``: malformed JSON, an integer of more
    digits than Python converts (4,300), arrays or objects nested deeper than Python's recursion
    (a ``RecursionError`` from the parser)."""
    try:
        return json.loads(text)
    except RecursionError:
        raise ValueError("nested too deeply to be read") from None
    except ValueError as e:
        if isinstance(e, json.JSONDecodeError) or "digits" not in str(e):
            raise
        raise ValueError("an integer of more than 4,300 digits") from None


def read_json(path: str) -> Any:
    """The JSON value in the file at ``path``, read as UTF-8. ``FileNotFoundError`` where nothing is
    there; another ``OSError`` (its ``strerror`` says why) for a folder, a FIFO or a device (a FIFO
    is opened without waiting for a writer, and nothing is read from it), a file over
    :data:`MAX_JSON_BYTES`, or one that cannot be read; ``ValueError`` for what is not JSON (see
    :func:`loads_json`; ``UnicodeDecodeError`` is one)."""
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0))
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(errno.EINVAL, f"{_kind(path)}, not a file", path)
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
