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


@pytest.fixture
def full_disk(monkeypatch):
    """``torch.save`` fails as on a full disk: half a file written, then the RuntimeError of its
    zip writer."""
    import torch

    def save(obj, f, *args, **kwargs):
        with open(f, "wb") as fh:
            fh.write(b"PK\x03\x04 half a file")
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 1508032 vs 1507928")

    monkeypatch.setattr(torch, "save", save)
