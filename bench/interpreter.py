"""The bench's runs under Triton's interpreter (CPU rehearsals: ``--smoke``, the CPU bench run)
refuse what the GPU JIT refuses: :func:`daal_testing.strict_interpreter_launches` (tests/)."""
from __future__ import annotations

import os
import sys


def tests_on_path() -> None:
    """``tests/`` on ``sys.path`` (last), for ``daal_testing``."""
    tests = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tests")
    if tests not in sys.path:
        sys.path.append(tests)


def strict_interpreter() -> None:
    """Under ``TRITON_INTERPRET=1``: a launch keyword that is neither a kernel parameter nor a
    compile option raises (the interpreter alone drops it). Nothing on a GPU."""
    from daal_triton.backend import interpreter_on

    if not interpreter_on():
        return
    tests_on_path()
    from daal_testing import strict_interpreter_launches

    strict_interpreter_launches()
