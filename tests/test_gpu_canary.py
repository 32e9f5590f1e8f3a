"""The canary of kernels no GPU had run (tests/gpu_canary.py) and the child-process launch that
guards them (daal_testing.run_with_deadline): on the CPU, what the GPU check relies on."""
import pytest

import gpu_canary
from daal_testing import run_with_deadline


def test_run_with_deadline_reports_hangs_and_failures(tmp_path):
    """The child-process launch the GPU tests guard a new kernel with: None on a clean exit, a
    hang killed at the deadline, a failure with its exit status and output."""
    assert run_with_deadline("print('ok')", 60, str(tmp_path)) is None
    assert run_with_deadline("import time; time.sleep(30)", 1, str(tmp_path)).startswith("hung")
    why = run_with_deadline("import sys; print('boom'); sys.exit(3)", 60, str(tmp_path))
    assert why.startswith("exit status 3") and "boom" in why


def test_the_canary_records_outcomes_and_vets_on_a_pass_without_failure(tmp_path, monkeypatch):
    """Without the variable nothing is written and everything may be timed; with it, ``canary``
    writes a pass when its block returns and a failure when it raises (a skip or an interrupt
    too), and ``unvetted`` names a variant with no pass, or with a failure beside its passes."""
    path = tmp_path / "canary.txt"
    monkeypatch.delenv(gpu_canary.CANARY_ENV, raising=False)
    with gpu_canary.canary("half", "t0"):
        pass
    assert not path.exists() and gpu_canary.unvetted("half") is None
    monkeypatch.setenv(gpu_canary.CANARY_ENV, str(path))
    assert "have not passed" in gpu_canary.unvetted("half")  # no file yet
    with gpu_canary.canary("half", "t1"):
        pass
    assert gpu_canary.unvetted("half") is None and "have not passed" in gpu_canary.unvetted("threshold")
    with pytest.raises(KeyboardInterrupt), gpu_canary.canary("threshold", "t2"):
        raise KeyboardInterrupt
    with pytest.raises(AssertionError), gpu_canary.canary("half", "t3"):
        raise AssertionError
    assert path.read_text().splitlines() == ["half pass t1", "threshold fail t2", "half fail t3"]
    assert "failed a GPU test" in gpu_canary.unvetted("half")
    assert "failed a GPU test" in gpu_canary.unvetted("threshold")
    assert "have not passed" in gpu_canary.unvetted("half-x")  # names match whole
    assert gpu_canary.filter_tiles_variant((128, 128, 8, 3, 128)) == "threshold-128x128-w8-s3-r128"
    assert gpu_canary.filter_tiles_variant((256, 128, 8, 3, None)) == "threshold-256x128-w8-s3"


def test_first_launches_fail_and_record_once_per_variant(tmp_path, monkeypatch):
    """A variant whose child exits non-zero fails the test and records a failure each time it is
    asked (its child runs once per process); one that exits 0 records nothing."""
    path = tmp_path / "canary.txt"
    monkeypatch.setenv(gpu_canary.CANARY_ENV, str(path))
    monkeypatch.setattr(gpu_canary, "_launched", {})
    gpu_canary.first_launches("good", "print('ok')", 60, "t0")
    assert not path.exists()
    marker = tmp_path / "runs"
    code = f"open({str(marker)!r}, 'a').write('x'); raise SystemExit(4)"
    for name in ("t1", "t2"):
        with pytest.raises(pytest.fail.Exception, match="bad's first launches in a child process: exit status 4"):
            gpu_canary.first_launches("bad", code, 60, name)
    assert marker.read_text() == "x"  # one child
    assert path.read_text().splitlines() == ["bad fail t1", "bad fail t2"]
    assert gpu_canary.unvetted("good") and "failed" in gpu_canary.unvetted("bad")
