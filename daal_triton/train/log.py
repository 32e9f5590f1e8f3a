"""The training program's one logging path.

Every line the programs print about their progress is ``[tag] message`` on stdout, flushed at
once; the tag names the program and, in a distributed run, the rank that wrote the line
(``[daal-train rank 1/2]``), so interleaved output of several processes can be told apart.
A :class:`Log` is made once per run and handed to whatever reports something; nothing in the
package keeps a global prefix.
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Log:
    """A callable that prints one tagged line: ``log("epoch 1/5: loss 0.3")``."""

    program: str = "daal-train"
    rank: int = 0
    world_size: int = 1

    @property
    def tag(self) -> str:
        if self.world_size > 1:
            return f"[{self.program} rank {self.rank}/{self.world_size}]"
        return f"[{self.program}]"

    def __call__(self, msg: str) -> None:
        print(f"{self.tag} {msg}", flush=True)


def plural(n: int, word: str) -> str:
    """``"1 thread"``, ``"2 threads"``, ``"2 classes"``: ``n`` and ``word``, with an ``s`` (``es``
    after s, x, ch, sh) unless ``n`` is 1."""
    if n == 1:
        return f"{n} {word}"
    return f"{n} {word}{'es' if word.endswith(('s', 'x', 'ch', 'sh')) else 's'}"
