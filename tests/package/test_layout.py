"""The import rules of the house plan (README "Layout"), read from the source with ``ast``.

- ``kernels/``: torch, triton and each other only (never the package or the training program);
- ``reference/``: torch only; its ``daal_loss`` reaches the package's composition
  (``daal_triton.core``) inside the function, never at import, and never triton;
- ``daal_triton/`` (the package): the two above, torch; triton directly only where it asks about
  the interpreter (``backend.py``) or counts launches (``launch_count.py``), inside functions;
- ``daal_triton/train/``: the public API, never ``daal_triton.kernels`` / ``daal_triton.reference``;
  triton only to tell a user that ``--compile`` needs it (``devices.py``, inside a function).
And importing the package and running the reference loss imports no triton at all.
"""
import ast
import os
import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]


def _stdlib_names():
    """The standard library's top-level modules: ``sys.stdlib_module_names`` (Python 3.10+); on
    Python 3.9 the builtins and what the standard library's folders hold."""
    names = getattr(sys, "stdlib_module_names", None)
    if names is not None:
        return set(names)
    import pkgutil
    import sysconfig
    stdlib = sysconfig.get_paths()["stdlib"]
    folders = [stdlib, os.path.join(stdlib, "lib-dynload")]
    return set(sys.builtin_module_names) | {m.name for m in pkgutil.iter_modules(folders)}


STDLIB = _stdlib_names() | {"__future__"}


def _imports(path: pathlib.Path):
    """``(absolute module, at module level?)`` for every import of ``path``; relative imports are
    resolved against the installed layout (``kernels/`` is ``daal_triton.kernels`` …)."""
    rel = path.relative_to(ROOT).with_suffix("")
    parts = list(rel.parts)
    if parts[0] in ("kernels", "reference"):
        parts = ["daal_triton"] + parts
    package = parts[:-1] if parts[-1] != "__init__" else parts[:-1]
    tree = ast.parse(path.read_text())
    top_level = {id(n) for n in tree.body}
    typing_only = set()  # under ``if TYPE_CHECKING:``: read by type checkers, never imported
    for node in tree.body:  # imports under `if`/`try` at module level are module-level too
        if isinstance(node, (ast.If, ast.Try)):
            top_level |= {id(n) for n in ast.walk(node)}
        if isinstance(node, ast.If) and getattr(node.test, "id", getattr(node.test, "attr", None)) == "TYPE_CHECKING":
            typing_only |= {id(n) for n in ast.walk(node)}
    out = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out += [(a.name, id(node) in top_level, id(node)) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package[:len(package) - node.level + 1]
                mod = ".".join(base + ([node.module] if node.module else []))
                names = [mod] if node.module else [f"{mod}.{a.name}" for a in node.names]
            else:
                names = [node.module]
            out += [(m, id(node) in top_level, id(node)) for m in names]
    # typing_extensions (a dependency of torch) where only type checkers read it, as the standard library
    return [(m, top) for m, top, node in out if m.split(".")[0] not in STDLIB
            and not (m == "typing_extensions" and node in typing_only)]


def _files(folder):
    return sorted((ROOT / folder).rglob("*.py"))


def _under(mod, *prefixes):
    return any(mod == p or mod.startswith(p + ".") for p in prefixes)


def test_the_rules_see_every_file():
    # a rename or move must not leave a room unchecked
    assert len(_files("kernels")) >= 7 and len(_files("reference")) >= 3
    assert len(_files("daal_triton/train")) >= 15
    assert ("daal_triton.core", False) in _imports(ROOT / "reference" / "daal.py")


@pytest.mark.parametrize("path", _files("kernels"), ids=lambda p: p.name)
def test_kernels_import_torch_triton_and_each_other(path):
    bad = [m for m, _ in _imports(path) if not _under(m, "torch", "triton", "daal_triton.kernels")]
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", _files("reference"), ids=lambda p: p.name)
def test_reference_imports_torch_and_the_composition_lazily(path):
    for mod, top in _imports(path):
        if _under(mod, "torch", "daal_triton.reference"):
            continue
        assert mod == "daal_triton.core" and not top, f"{path.name} imports {mod} (module level: {top})"


PACKAGE = [p for p in _files("daal_triton") if "train" not in p.relative_to(ROOT).parts]
TRITON_USERS = {"backend.py", "launch_count.py"}


@pytest.mark.parametrize("path", PACKAGE, ids=lambda p: p.name)
def test_package_imports_torch_its_two_rooms_and_triton_lazily(path):
    for mod, top in _imports(path):
        if _under(mod, "torch", "daal_triton"):
            assert not _under(mod, "daal_triton.train"), f"{path.name} imports the training program"
            continue
        assert _under(mod, "triton") and path.name in TRITON_USERS and not top, \
            f"{path.name} imports {mod} (module level: {top})"


TRAIN_MAY_IMPORT = ("torch", "torchvision", "numpy", "scipy", "sklearn", "matplotlib", "tqdm", "PIL",
                    "threadpoolctl", "pytorch_metric_learning", "daal_triton")


@pytest.mark.parametrize("path", _files("daal_triton/train"), ids=lambda p: str(p.relative_to(ROOT / "daal_triton")))
def test_training_program_uses_the_public_api(path):
    for mod, top in _imports(path):
        assert not _under(mod, "daal_triton.kernels", "daal_triton.reference"), f"{path.name} imports {mod}"
        if _under(mod, "triton"):
            assert path.name == "devices.py" and not top, f"{path.name} imports {mod}"
            continue
        assert _under(mod, *TRAIN_MAY_IMPORT), f"{path.name} imports {mod}"


def test_reference_loss_runs_without_triton(tmp_path):
    code = ("import sys, torch, daal_triton as d\n"
            "e, y = torch.randn(9, 5, dtype=torch.float64), torch.arange(9) % 3\n"
            "s = torch.randn(3, 2, 5, dtype=torch.float64)\n"
            "loss = d.reference.daal_loss(e, y, s, k=2)\n"
            "assert torch.isfinite(loss), loss\n"
            "print('triton' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "TRITON_INTERPRET")}
    out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"
