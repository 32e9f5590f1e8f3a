"""Files written whole or not at all (no torch here: ``daal-study`` writes its report with them)."""
from __future__ import annotations

import os


def write_atomically(path: str, write) -> None:
    """``write(path + ".tmp")``, then rename it to ``path``: a reader never sees half a file. When
    the writing fails (a full disk: ``torch.save`` raises a RuntimeError from its zip writer), the
    ``.tmp`` file is removed and an ``OSError`` names ``path``; anything else raised midway
    (Ctrl-C's KeyboardInterrupt) removes it too and goes on as it was."""
    tmp = path + ".tmp"
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
