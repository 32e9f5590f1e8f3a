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
