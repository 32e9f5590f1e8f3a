"""scripts/mutants.py: the bugs mutation audits found the tests blind to, kept caught. Here the
catalogue is checked against the code (every mutant still applies, once, and names tests that
exist) and one mutant runs end to end; the script runs them all (about 11 minutes)."""
import importlib.util
import os
import subprocess
import sys

ROOT = os.path.join(os.path.dirname(__file__), "..", "..")
spec = importlib.util.spec_from_file_location("mutants", os.path.join(ROOT, "scripts", "mutants.py"))
mutants = importlib.util.module_from_spec(spec)
spec.loader.exec_module(mutants)


def test_every_mutant_applies_once_and_names_existing_tests():
    for m in mutants.MUTANTS:
        with open(os.path.join(ROOT, m.path)) as f:
            assert f.read().count(m.old) == 1, f"{m.name}: its text no longer occurs once in {m.path}"
        assert m.old != m.new, m.name
        path = m.tests[0].split("::")[0]
        assert os.path.isfile(os.path.join(ROOT, path)), (m.name, path)
    assert len({m.name for m in mutants.MUTANTS}) == len(mutants.MUTANTS)


def test_a_mutant_is_caught_and_a_harmless_edit_survives(monkeypatch, capsys):
    """The script's verdicts: the memory-bank mutant caught (exit 0), an edit that changes
    nothing reported as surviving (exit 1); the checkout itself is left as it was."""
    bank = next(m for m in mutants.MUTANTS if m.name == "bank_len")
    with open(os.path.join(ROOT, bank.path)) as f:
        before = f.read()
    assert mutants.main(["-k", "bank_len"]) == 0
    assert "bank_len" in capsys.readouterr().out
    noop = bank._replace(name="noop", new=bank.old + " ")
    monkeypatch.setattr(mutants, "MUTANTS", (noop,))
    assert mutants.main([]) == 1
    out = capsys.readouterr().out
    assert "noop" in out and "SURVIVED" in out and "0 of 1 mutants caught" in out, out
    with open(os.path.join(ROOT, bank.path)) as f:
        assert f.read() == before
