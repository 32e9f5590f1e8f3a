"""Shared by the training program's tests."""
import pytest


@pytest.fixture
def error_line(capsys):
    """``error_line(program)``: the one ``<program>: error: ...`` line the last command wrote to
    stderr (asserting there is exactly one, and no traceback anywhere)."""

    def check(program: str) -> str:
        captured = capsys.readouterr()
        lines = [ln for ln in captured.err.splitlines() if ln.strip()]
        assert len(lines) == 1 and lines[0].startswith(f"{program}: error: "), captured.err
        assert "Traceback" not in captured.err + captured.out
        return lines[0]

    return check
