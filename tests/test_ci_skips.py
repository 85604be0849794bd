"""With CI=true no test may skip: tests/conftest.py's hooks fail the run for any skip, however
it was asked for, and name each skipped test with its reason; outside CI skips stay skips.

Each case runs pytest in a subprocess on a tiny test tree whose conftest.py is a copy of ours,
so the hooks under test are the real ones. A hook that only watched `missing()`, or one that
printed the skips but left the exit status at 0, fails here."""

from __future__ import annotations

from pathlib import Path

import pytest

pytest_plugins = ["pytester"]

SKIPPING = '''
import pytest

def test_passes():
    pass

def test_skips_inside():
    pytest.skip("no frobnicator here")

@pytest.mark.skipif(True, reason="never on this platform")
def test_skipif():
    pass

@pytest.mark.xfail(reason="known bug", strict=True)
def test_expected_failure():
    assert False
'''
SKIPPED_MODULE = '''
import pytest

pytest.importorskip("candorlm_no_such_module")

def test_never_collected():
    pass
'''


@pytest.fixture
def tree(pytester):
    pytester.makeconftest(Path(__file__).with_name("conftest.py").read_text())
    return pytester


def _run(tree, monkeypatch, ci: bool, *files):
    if ci:
        monkeypatch.setenv("CI", "true")
    else:
        monkeypatch.delenv("CI", raising=False)
    return tree.runpytest_subprocess("-p", "no:cacheprovider", *files)


def test_any_skip_fails_the_run_in_ci(tree, monkeypatch):
    tree.makepyfile(test_skipping=SKIPPING, test_skipped_module=SKIPPED_MODULE)
    r = _run(tree, monkeypatch, True)
    assert r.ret == pytest.ExitCode.TESTS_FAILED, r.stdout.str()
    r.assert_outcomes(passed=1, skipped=3, xfailed=1)  # the tests themselves ran as usual
    out = r.stdout.str()
    r.stdout.fnmatch_lines(["*CI=true: 3 skipped, and nothing may skip in CI*"])
    for line in ("SKIPPED IN CI test_skipping.py::test_skips_inside: *no frobnicator here*",
                 "SKIPPED IN CI test_skipping.py::test_skipif: *never on this platform*",
                 "SKIPPED IN CI test_skipped_module.py: *candorlm_no_such_module*"):
        r.stdout.fnmatch_lines([line])
    assert "SKIPPED IN CI test_skipping.py::test_expected_failure" not in out


def test_outside_ci_skips_are_skips(tree, monkeypatch):
    tree.makepyfile(test_skipping=SKIPPING, test_skipped_module=SKIPPED_MODULE)
    r = _run(tree, monkeypatch, False)
    assert r.ret == pytest.ExitCode.OK, r.stdout.str()
    r.assert_outcomes(passed=1, skipped=3, xfailed=1)
    assert "SKIPPED IN CI" not in r.stdout.str()


def test_ci_without_skips_passes_and_failures_stay_failures(tree, monkeypatch):
    tree.makepyfile(test_fine="def test_ok():\n    pass\n")
    assert _run(tree, monkeypatch, True, "test_fine.py").ret == pytest.ExitCode.OK
    tree.makepyfile(test_bad="import pytest\n\ndef test_no():\n    assert False\n\n"
                             "def test_skip():\n    pytest.skip('x')\n")
    r = _run(tree, monkeypatch, True, "test_bad.py")
    assert r.ret == pytest.ExitCode.TESTS_FAILED
    r.stdout.fnmatch_lines(["SKIPPED IN CI test_bad.py::test_skip: x"])
