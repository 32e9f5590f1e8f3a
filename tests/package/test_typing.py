"""The types users' checkers see (PEP 561), read by mypy (the ``dev`` extra) from the layout an
install has: ``daal_triton`` with ``kernels/`` and ``reference/`` inside it (setup.py's
``package_dir``), found on the path as an installed package is, so only through ``py.typed``.

- the package type-checks (pyproject.toml ``[tool.mypy]``), the training program
  ``daal_triton.train`` included since 2026-12-07 (its untyped third-party imports, scikit-learn,
  torchvision, tqdm, SciPy, pytorch-metric-learning, are read as ``Any``);
- a user's script sees the public API's own types: ``DAALLoss``, the hyperparameter attributes,
  ``daal_loss``'s return type by ``return_parts`` (its overloads), and mypy refuses a misspelled
  keyword or a string for a float hyperparameter.
"""
import ast
import os
import pathlib
import re
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]

USER_SCRIPT = '''\
import torch
import daal_triton
from daal_triton import DAALLoss, DAALParts, daal_loss, init_segments, knn

emb = torch.randn(16, 8, requires_grad=True)
labels = torch.randint(0, 4, (16,))
loss_fn = DAALLoss(num_classes=4, embedding_dim=8)
seg = init_segments(4, 8)
reveal_type(loss_fn)  # R1
reveal_type(loss_fn.alpha)  # R2
reveal_type(loss_fn.k)  # R3
reveal_type(loss_fn.reduction)  # R4
reveal_type(daal_loss(emb, labels, seg))  # R5
reveal_type(daal_loss(emb, labels, seg, alpha=32.0, return_parts=False))  # R6
reveal_type(daal_loss(emb, labels, seg, return_parts=True))  # R7
reveal_type(daal_loss(emb, labels, seg, return_parts=bool(labels.sum() > 0)))  # R8
reveal_type(knn(emb, emb, 3))  # R9
reveal_type(daal_triton.pairwise_distance)  # R10
daal_loss(emb, labels, seg).backward()
parts: DAALParts = daal_loss(emb, labels, seg, return_parts=True, k=2)
print(parts.radius, parts.margin)
loss_fn.alpha = 32.0
loss_fn.normalize = False
loss_fn.alpha = "large"  # E1
daal_loss(emb, labels, seg, alfa=32.0)  # E2
daal_loss(emb, labels, seg, return_parts=True).backward()  # E3
'''

#: what mypy reveals at each ``# R<n>`` line (builtins unqualified, as mypy 2 writes them)
REVEALED = {
    "R1": '"daal_triton.loss.DAALLoss"',
    "R2": '"float"',
    "R3": '"int"',
    "R4": '"str"',
    "R5": '"torch._tensor.Tensor"',
    "R6": '"torch._tensor.Tensor"',
    "R7": '"daal_triton.core.DAALParts"',
    "R8": '"torch._tensor.Tensor | daal_triton.core.DAALParts"',
    "R9": '"tuple[torch._tensor.Tensor, torch._tensor.Tensor]"',
    "R10": '"def (x: torch._tensor.Tensor, y: torch._tensor.Tensor, *, backend: str =, '
           'check_values: bool | None =) -> torch._tensor.Tensor"',
}
#: the error code mypy gives at each ``# E<n>`` line
ERRORS = {"E1": "assignment", "E2": "call-overload", "E3": "attr-defined"}


def _installed_layout(root: pathlib.Path) -> None:
    """``root/daal_triton/...`` as setup.py's ``package_dir`` installs it (links to the sources)."""
    tree = ast.parse((ROOT / "setup.py").read_text(encoding="utf-8"))
    package_dir = next(ast.literal_eval(node.value) for node in tree.body if isinstance(node, ast.Assign)
                       and [t.id for t in node.targets if isinstance(t, ast.Name)] == ["PACKAGE_DIR"])
    for package, folder in package_dir.items():
        out = root.joinpath(*package.split("."))
        out.mkdir(parents=True, exist_ok=True)
        for f in (ROOT / folder).iterdir():
            if f.suffix == ".py" or f.name == "py.typed":
                (out / f.name).symlink_to(f)


@pytest.fixture(scope="module")
def mypy_report(tmp_path_factory):
    """mypy's lines for the package and the user's script, checked together (one start of mypy)."""
    pytest.importorskip("mypy", reason="mypy comes with the dev extra")
    tmp = tmp_path_factory.mktemp("typing")
    _installed_layout(tmp / "site")
    (tmp / "user_script.py").write_text(USER_SCRIPT, encoding="utf-8")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MYPY")}
    env["PYTHONPATH"] = str(tmp / "site")  # before the editable install's finder, which mypy cannot read
    done = subprocess.run([sys.executable, "-m", "mypy", "--config-file", str(ROOT / "pyproject.toml"),
                           "--python-executable", sys.executable, "--cache-dir", str(tmp / "cache"),
                           "--no-error-summary", "--hide-error-context", "--show-error-codes",
                           "-p", "daal_triton", "-m", "user_script"],
                          cwd=tmp, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode in (0, 1), done.stderr[-3000:]  # 1: errors found (the script's own)
    return done.stdout.splitlines()


def test_the_package_type_checks(mypy_report):
    package = [line for line in mypy_report if not line.startswith("user_script.py")]
    assert not package, "\n".join(package)


def test_users_see_the_public_types(mypy_report):
    marks = {}
    for number, line in enumerate(USER_SCRIPT.splitlines(), 1):
        found = re.search(r"# ([RE]\d+)$", line)
        if found:
            marks[number] = found.group(1)
    revealed, errors, unexpected = {}, {}, []
    for line in mypy_report:
        found = re.match(r"user_script\.py:(\d+): (note|error): (.*)", line)
        if not found:
            continue
        mark = marks.get(int(found.group(1)), "")
        if found.group(2) == "note" and found.group(3).startswith("Revealed type is ") and mark.startswith("R"):
            revealed[mark] = found.group(3)[len("Revealed type is "):].replace("builtins.", "")
        elif found.group(2) == "error" and mark.startswith("E"):
            errors[mark] = re.search(r"\[([a-z-]+)\]$", found.group(3)).group(1)
        elif found.group(2) == "error":
            unexpected.append(line)
    assert not unexpected, "\n".join(unexpected)  # e.g. "import-not-found": no py.typed
    assert revealed == REVEALED
    assert errors == ERRORS


def test_the_declared_types_follow_the_signatures():
    """What the checkers read cannot drift from what runs: ``DAALLoss``'s declared hyperparameter
    attributes are ``Hyperparameters``' fields (name and type), and the overloads' ``LossOptions``
    are ``daal_loss``'s keyword arguments other than ``return_parts``, with their annotations."""
    import dataclasses
    import inspect

    from daal_triton import DAALLoss, Hyperparameters, daal_loss
    from daal_triton.functional import LossOptions

    fields = {f.name: f.type for f in dataclasses.fields(Hyperparameters)}
    assert {n: DAALLoss.__annotations__.get(n) for n in fields} == fields
    keywords = {name: p.annotation for name, p in inspect.signature(daal_loss).parameters.items()
                if p.kind is inspect.Parameter.KEYWORD_ONLY and name != "return_parts"}
    # a TypedDict keeps its annotations as ForwardRefs under ``from __future__ import annotations``
    declared = {n: getattr(t, "__forward_arg__", t) for n, t in LossOptions.__annotations__.items()}
    assert declared == keywords
