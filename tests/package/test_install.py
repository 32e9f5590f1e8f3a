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
