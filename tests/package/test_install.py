"""The install layout: kernels/ and reference/ exist only inside the package."""
import os
import subprocess
import sys


def _run(code, tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True)


def test_no_top_level_kernels_or_reference(tmp_path):
    out = _run("import importlib.util as u; print(u.find_spec('kernels'), u.find_spec('reference'))", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "None None"


def test_subpackages_import(tmp_path):
    out = _run("import daal_triton.reference as r, daal_triton.kernels as k, daal_triton as d;"
               "print(r.daal_loss is not None, d.DAALLoss.__name__)", tmp_path)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "True DAALLoss"


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def test_the_source_folder_alone_says_why_it_cannot_be_imported(tmp_path):
    """With a non-editable install, ``python -c``/``-m`` or a script run from a clone's root import
    the source folder ``daal_triton/``, which lacks ``kernels/`` and ``reference/`` (they install
    inside the package): "No module named 'daal_triton.reference'" came at the first loss. Here the
    source folder is imported without site-packages (``-S``: no editable install to fill it in)."""
    import shutil

    shutil.copytree(os.path.join(ROOT, "daal_triton"), tmp_path / "daal_triton",
                    ignore=shutil.ignore_patterns("__pycache__"))
    out = subprocess.run([sys.executable, "-S", "-c", "import daal_triton"], cwd=tmp_path,
                         env={k: v for k, v in os.environ.items() if k != "PYTHONPATH"}, capture_output=True, text=True)
    assert out.returncode == 1
    assert "a source folder without the subpackages kernels/ and reference/" in out.stderr
    assert "Run from another directory, or install the clone with `pip install -e .`" in out.stderr


def _readme_commands():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        block = f.read().split("```bash\n", 1)[1].split("```", 1)[0]
    return [line.split("#", 1)[0].strip() for line in block.splitlines() if line.strip()]


def test_ci_runs_the_readme_test_command_with_what_setup_installs():
    """The README opens with two commands; CI (.ci/run) runs the second's test part after the
    set-up, and what that command needs (pytest-xdist for ``-n``) is in the ``dev`` extra."""
    train, tests = _readme_commands()
    assert train.startswith("bash scripts/setup_env.sh && ") and "daal-train" in train
    setup, test_cmd = tests.split(" && ")
    assert setup == "bash scripts/setup_env.sh"
    with open(os.path.join(ROOT, ".ci", "run"), encoding="utf-8") as f:
        ci = [line.strip() for line in f if line.strip() and not line.lstrip().startswith("#")]
    assert "bash scripts/setup_env.sh" in " ".join(ci)
    assert test_cmd in ci, f"{test_cmd!r} is not a line of .ci/run"
    with open(os.path.join(ROOT, "setup.py"), encoding="utf-8") as f:
        dev = f.read().split('"dev": [', 1)[1].split("]", 1)[0]
    if " -n " in f" {test_cmd} ":
        assert '"pytest-xdist' in dev


def _build(source, out, what):
    """Build ``what`` ("sdist" or "wheel") of the project in ``source`` into ``out`` (setuptools'
    PEP 517 backend, in a child process: no network, no build isolation); its file name."""
    code = f"from setuptools import build_meta as b; print(b.build_{what}({str(out)!r}))"
    done = subprocess.run([sys.executable, "-c", code], cwd=source, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
    return os.path.join(out, done.stdout.strip().splitlines()[-1])


def test_the_sdist_and_the_wheel_hold_the_package_and_what_it_links_to(tmp_path):
    """The wheel installs ``daal_triton`` alone (kernels and reference inside it); the sdist holds
    what builds it (README.md, which setup.py reads) and the docs the README links to, no test
    file without the conftest and helpers it imports, and builds the same wheel on its own."""
    import shutil
    import tarfile
    import zipfile

    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                            cwd=ROOT, capture_output=True, check=True).stdout.decode().split("\0")
    src = tmp_path / "src"
    for name in filter(None, listed):
        if os.path.isfile(os.path.join(ROOT, name)):  # a deleted file not yet committed is skipped
            (src / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(os.path.join(ROOT, name), src / name)
    sdist = _build(src, tmp_path / "dist", "sdist")
    wheel = _build(src, tmp_path / "dist", "wheel")
    with tarfile.open(sdist) as tar:
        top = tar.getnames()[0].split("/")[0]
        in_sdist = {n.split("/", 1)[1] for n in tar.getnames() if "/" in n}
        tar.extractall(tmp_path / "unpacked", filter="data")
    assert {"README.md", "setup.py", "pyproject.toml", "docs/method.md", "docs/training.md",
            "docs/kernels.md", "kernels/knn.py", "reference/daal.py"} <= in_sdist
    assert not [n for n in in_sdist if n.startswith(("tests/", "bench/", "scripts/"))]
    with zipfile.ZipFile(wheel) as whl:
        in_wheel = sorted(n for n in whl.namelist() if ".dist-info/" not in n)
    assert {n.split("/")[0] for n in in_wheel} == {"daal_triton"}
    assert {"daal_triton/kernels/knn.py", "daal_triton/reference/daal.py",
            "daal_triton/train/data/shapes.py", "daal_triton/py.typed"} <= set(in_wheel)
    again = _build(tmp_path / "unpacked" / top, tmp_path / "again", "wheel")
    with zipfile.ZipFile(again) as whl:
        assert sorted(n for n in whl.namelist() if ".dist-info/" not in n) == in_wheel
